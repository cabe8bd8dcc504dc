"""PagedKVCache drives the unchanged model: chunked prefill over scattered pages gives the full forward's logits."""

import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxinfer.engine import PagedKVCache

from testlib import tiny_model_config

CFG = tiny_model_config()


@nnx.jit
def forward(model, tokens, positions=None, cache=None):
  return model(tokens, positions, None, cache)


def test_two_sequences_prefilled_in_chunks_over_scattered_pages(model):
  rng = np.random.default_rng(0)
  a, b = rng.integers(0, CFG.vocab_size, size=13), rng.integers(0, CFG.vocab_size, size=6)
  page_size, pages_per_seq = 4, 4
  k, v = PagedKVCache.create_pools(CFG, num_pages=10, page_size=page_size)
  table = np.zeros((3, pages_per_seq), np.int32)  # 3 sequence rows: the last one is padding
  table[0] = [7, 2, 9, 0]  # pages in no particular order
  table[1, :2] = [5, 1]
  got_a, got_b = [], []
  # step 1: a[0:8] and b[0:6]; step 2: a[8:13] alone (b done); 2 padding rows each time
  for chunks in ([(0, 8), (0, 6)], [(8, 13)]):
    toks, pos, cu, kv_lens = [], [], [0], []
    for seq, (lo, hi) in zip((a, b), chunks):
      toks += list(seq[lo:hi])
      pos += list(range(lo, hi))
      cu.append(cu[-1] + hi - lo)
      kv_lens.append(hi)
    n = len(toks)
    cu += [cu[-1]] * (4 - len(cu))
    kv_lens += [0] * (3 - len(kv_lens))
    cache = PagedKVCache(k, v, jnp.asarray(table), jnp.asarray(kv_lens, jnp.int32), jnp.asarray(cu, jnp.int32),
                         jnp.int32(len(chunks)))
    logits, cache = forward(model, jnp.asarray([toks + [0, 0]]), jnp.asarray([pos + [0, 0]]), cache)
    k, v = cache.k_pages, cache.v_pages
    got_a.append(logits[0, :chunks[0][1] - chunks[0][0]])
    if len(chunks) > 1:
      got_b.append(logits[0, cu[1]:cu[2]])
    assert np.isfinite(np.asarray(logits[0, n:])).all()
  full_a = forward(model, jnp.asarray(a[None]))
  full_b = forward(model, jnp.asarray(b[None]))
  np.testing.assert_allclose(np.concatenate(got_a), full_a[0], atol=2e-5, rtol=2e-5)
  np.testing.assert_allclose(got_b[0], full_b[0], atol=2e-5, rtol=2e-5)
  # padding rows wrote nothing: pages owned by nobody are still zero
  for layer_k in k:
    assert not np.asarray(layer_k[jnp.asarray([3, 4, 6, 8])]).any()
