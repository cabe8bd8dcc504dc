"""jaxinfer.generate: batched prefill + a jitted decode loop (lax.while_loop: no host round trip per token).

Static: the model graph, the padded batch, prompt and output sizes (each rounded up to a bucket, so a
serving loop compiles a bounded number of programs). Dynamic: the tokens, lengths, max_new_tokens,
sampling parameters and stop ids.
"""

from __future__ import annotations

import functools
import logging
import weakref
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxinfer.generation.sampling import SamplingParams, row_keys, sample_tokens
from jaxinfer.models.kv_cache import KVCache
from jaxinfer.models.transformer import Transformer

log = logging.getLogger(__name__)

MIN_BUCKET = 16
MAX_STOP_IDS = 8
PAD_SEGMENT, TOKEN_SEGMENT = 0, 1
_compilations = {"count": 0}


def bucket(n: int, minimum: int = MIN_BUCKET) -> int:
  """Smallest power of two >= n (and >= minimum)."""
  return max(minimum, 1 << max(0, int(n - 1).bit_length()))


def compilation_count() -> int:
  """How many decode programs have been traced (and so compiled) in this process."""
  return _compilations["count"]


def validate_prompts(prompts, max_new_tokens: int, vocab_size: int, max_positions: int) -> None:
  if not isinstance(prompts, (list, tuple)) or not prompts:
    raise ValueError("prompts must be a non-empty list of token-id lists")
  if not isinstance(max_new_tokens, (int, np.integer)) or max_new_tokens < 1:
    raise ValueError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
  for i, prompt in enumerate(prompts):
    if len(prompt) == 0:
      raise ValueError(f"prompt {i} is empty: generation needs at least one token")
    ids = np.asarray(prompt)
    if not np.issubdtype(ids.dtype, np.integer):
      raise ValueError(f"prompt {i} holds non-integer token ids")
    bad = ids[(ids < 0) | (ids >= vocab_size)]
    if bad.size:
      raise ValueError(f"prompt {i}: token id {int(bad[0])} is outside the vocabulary [0, {vocab_size})")
    if len(prompt) + max_new_tokens > max_positions:
      raise ValueError(f"prompt {i}: length {len(prompt)} + max_new_tokens {max_new_tokens} = "
                       f"{len(prompt) + max_new_tokens} exceeds the model's max_position_embeddings {max_positions}")


def _generate_padded(graphdef, state, tokens, lengths, max_new_tokens, temperature, top_k, top_p, min_p, seeds,
                     stop_ids, *, max_new_bucket: int, sharding=None):
  _compilations["count"] += 1  # runs at trace time only
  log.info("compiling decode program: batch=%d prompt=%d new=%d", tokens.shape[0], tokens.shape[1], max_new_bucket)
  model = nnx.merge(graphdef, state)
  batch, prompt_len = tokens.shape
  pad = prompt_len - lengths  # left padding
  index = jnp.arange(prompt_len, dtype=jnp.int32)[None, :]
  positions = jnp.maximum(index - pad[:, None], 0)
  segments = jnp.where(index >= pad[:, None], TOKEN_SEGMENT, PAD_SEGMENT).astype(jnp.int32)
  cache = KVCache.create(model.config, batch, prompt_len + max_new_bucket)
  if sharding is not None:
    cache = _constrain_cache(cache, sharding, model.config)
  logits, cache = model(tokens, positions, segments, cache)

  def pick(logits_last, step):
    keys = row_keys(seeds, lengths + step)
    return sample_tokens(logits_last, keys, temperature, top_k, top_p, min_p)

  first = pick(logits[:, -1], 0)
  out = jnp.zeros((batch, max_new_bucket), jnp.int32).at[:, 0].set(first)
  done = jnp.any(first[:, None] == stop_ids[None, :], axis=-1)

  def cond(carry):
    step, _, done, _, _ = carry
    return (step < max_new_tokens) & ~jnp.all(done)

  def body(carry):
    step, out, done, cache, last = carry
    logits, cache = model(last[:, None], (lengths + step - 1)[:, None],
                          jnp.full((batch, 1), TOKEN_SEGMENT, jnp.int32), cache)
    token = pick(logits[:, 0], step)
    out = out.at[:, step].set(jnp.where(done, 0, token))
    done = done | jnp.any(token[:, None] == stop_ids[None, :], axis=-1)
    return step + 1, out, done, cache, token

  steps, out, _, _, _ = jax.lax.while_loop(cond, body, (jnp.int32(1), out, done, cache, first))
  return out, steps


_DECODE_FNS: dict = {}  # graphdef -> jitted decode loop closing over it (hashed once per graph, not per call)
_SPLITS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()  # model -> (graphdef, state, jitted)


def _split(model):
  """(graphdef, state, jitted decode loop) of a model, split on its first generate() call and kept.

  Changing a model's parameters in place after that is not seen by generate(); call forget(model) first."""
  entry = _SPLITS.get(model)
  if entry is None:
    graphdef, state = nnx.split(model)
    fn = _DECODE_FNS.get(graphdef)
    if fn is None:
      fn = _DECODE_FNS[graphdef] = jax.jit(functools.partial(_generate_padded, graphdef),
                                           static_argnames=("max_new_bucket", "sharding"))
    entry = _SPLITS[model] = (graphdef, state, fn)
  return entry


def _constrain_cache(cache, sharding, cfg):
  """A sharded model's cache: rows over data, KV heads over the heads' axes when they divide (else replicated;
  XLA's partitioner then serves every query-head shard from the whole, small, KV)."""
  from jax.sharding import NamedSharding
  from jax.sharding import PartitionSpec as P

  rows = sharding.rows(cache.k[0].shape[0])
  heads = sharding.heads if sharding.kv_repeat == 1 else None
  kv = NamedSharding(sharding.mesh, P(rows, None, heads, None))
  meta = NamedSharding(sharding.mesh, P(rows))
  return cache.replace(k=tuple(jax.lax.with_sharding_constraint(x, kv) for x in cache.k),
                       v=tuple(jax.lax.with_sharding_constraint(x, kv) for x in cache.v),
                       positions=jax.lax.with_sharding_constraint(cache.positions, meta),
                       segment_ids=jax.lax.with_sharding_constraint(cache.segment_ids, meta))


def _data_size(sharding) -> int:
  return 1 if sharding is None else int(np.prod([sharding.mesh.shape[a] for a in sharding.row_axes]))


def forget(model) -> None:
  """Drops generate()'s split of `model` (after its parameters were changed in place)."""
  _SPLITS.pop(model, None)


def generate(model: Transformer, prompts: Sequence[Sequence[int]], max_new_tokens: int,
             sampling: SamplingParams = SamplingParams(), stop_token_ids: Sequence[int] = (),
             speculative=None) -> list[list[int]]:
  """Generates up to max_new_tokens for each prompt; a stop token ends its sequence and is included.
  speculative: a jaxinfer.SpeculativeConfig: generate through the engine with that speculative method."""
  cfg = model.config
  validate_prompts(prompts, max_new_tokens, cfg.vocab_size, cfg.max_position_embeddings)
  if speculative is not None:
    from jaxinfer.engine.speculative.generate import speculative_generate

    return speculative_generate(model, prompts, max_new_tokens, sampling, stop_token_ids, speculative)
  if len(stop_token_ids) > MAX_STOP_IDS:
    raise ValueError(f"stop_token_ids: at most {MAX_STOP_IDS} stop ids, got {len(stop_token_ids)}")
  from jaxinfer.engine.sharding import engine_sharding, to_host  # lazily: the engine package imports this module

  sharding = engine_sharding(model)
  n = len(prompts)
  batch = bucket(max(n, _data_size(sharding)), minimum=1)  # rows split evenly over a data axis
  prompt_len = bucket(max(len(p) for p in prompts))
  tokens = np.zeros((batch, prompt_len), np.int32)
  lengths = np.ones((batch,), np.int32)  # padding rows hold a single token 0
  for i, p in enumerate(prompts):
    tokens[i, prompt_len - len(p):] = p
    lengths[i] = len(p)
  stops = np.full((MAX_STOP_IDS,), -1, np.int32)
  stops[:len(stop_token_ids)] = list(stop_token_ids)
  row = lambda value, dtype: jnp.full((batch,), value, dtype)
  _, state, decode = _split(model)
  out, steps = decode(
      state, jnp.asarray(tokens), jnp.asarray(lengths), jnp.int32(max_new_tokens),
      row(sampling.temperature, jnp.float32), row(sampling.top_k, jnp.int32), row(sampling.top_p, jnp.float32),
      row(sampling.min_p, jnp.float32), row(sampling.seed, jnp.uint32) + jnp.arange(batch, dtype=jnp.uint32),
      jnp.asarray(stops), max_new_bucket=bucket(max_new_tokens), sharding=sharding)
  out = to_host(out)[:n, :int(to_host(steps))]
  stop_set = set(int(s) for s in stop_token_ids)
  results = []
  for row_tokens in out.tolist():
    kept = []
    for t in row_tokens:
      kept.append(t)
      if t in stop_set:
        break
    results.append(kept)
  return results
