"""Teacher-forced logits through the engine's paged KV path, for comparing KV cache dtypes (tests, the
kv_quantization experiment).

  logits = paged_logits(model, token_ids, kv_cache_dtype="int8", page_size=16, chunk=64)  # [n, vocab]

The sequence is fed `chunk` tokens at a time (chunked prefill): each chunk's keys/values are written into a
KVPool of the chosen dtype (quantize on write for int8 / float8_e4m3fn) and the chunk attends over the pool
with ragged_paged_attention, exactly as an engine step does (PagedKVCache inside the model). With chunk=1
every token is a decode step (paged_attention, the decode kernel).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxinfer.engine.kv_pool import KVPool
from jaxinfer.engine.paged_cache import PagedKVCache


@functools.lru_cache(maxsize=None)
def _chunk_fn(graphdef, attention_impl, interpret: bool, decode_only: bool):
  def run(state, pool: KVPool, tokens, positions, kv_len, slots, table):
    model = nnx.merge(graphdef, state)
    n = tokens.shape[0]
    cache = PagedKVCache(k_pages=pool.k, v_pages=pool.v, page_table=table, kv_lens=kv_len[None],
                         cu_q_lens=jnp.stack([jnp.int32(0), jnp.sum(slots < pool.num_slots).astype(jnp.int32)]),
                         num_seqs=jnp.int32(1), slots=slots, attention_impl=attention_impl, interpret=interpret,
                         decode_only=decode_only, k_scales=pool.k_scales, v_scales=pool.v_scales)
    seg = jnp.where(slots < pool.num_slots, 0, -1).astype(jnp.int32)
    logits, cache = model(tokens[None], positions[None], seg[None], cache)
    pool = pool.replace(k=cache.k_pages, v=cache.v_pages, k_scales=cache.k_scales, v_scales=cache.v_scales)
    return logits[0, :n], pool

  return jax.jit(run, donate_argnums=(1,))


def paged_logits(model, token_ids, *, kv_cache_dtype=None, page_size: int = 16, chunk: int = 64,
                 key_granularity: str = "per_channel", attention_impl=None, interpret: bool = False,
                 capacity: int = 0):
  """float32 logits [len(token_ids), vocab] of every position, the KV cache held in a paged pool of
  kv_cache_dtype (None: the model's dtype). capacity: pool tokens at least (sequences of different lengths
  with the same capacity share one compiled program)."""
  ids = np.asarray(token_ids, np.int32)
  n = ids.shape[0]
  if n < 1 or chunk < 1:
    raise ValueError(f"token_ids must be non-empty and chunk >= 1, got {n} tokens, chunk={chunk}")
  pages = -(-max(n, capacity) // page_size)
  graphdef, state = nnx.split(model)
  pool = KVPool.create(model.config, pages, page_size, kv_cache_dtype, key_granularity=key_granularity)
  table = jnp.arange(pages, dtype=jnp.int32)[None]
  fn = _chunk_fn(graphdef, attention_impl, bool(interpret), chunk == 1)
  out = []
  for start in range(0, n, chunk):
    m = min(chunk, n - start)
    pos = np.arange(start, start + chunk, dtype=np.int32)
    slots = np.where(np.arange(chunk) < m, pos, pages * page_size).astype(np.int32)  # padding: out of pool
    toks = np.zeros((chunk,), np.int32)
    toks[:m] = ids[start:start + m]
    logits, pool = fn(state, pool, jnp.asarray(toks), jnp.asarray(np.minimum(pos, n - 1)), jnp.int32(start + m),
                      jnp.asarray(slots), table)
    out.append(np.asarray(logits)[:m])
  return np.concatenate(out, axis=0)
