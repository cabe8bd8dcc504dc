"""Hydragen shared-prefix attention equals every sequence attending to its own prefix + suffix copy.

Tolerances: float32 inputs, float32 math on both sides; only summation order differs (1e-5). bfloat16
inputs are upcast identically on both sides, so the bound is the final cast to bfloat16 (one ulp, 2^-8).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.shared_prefix_attention import merge_partials, shared_prefix_attention
from testlib import assert_close, random_page_table, randn


def make(seed, batch, q_heads, kv_heads, d, prefix_len, max_suffix, dtype):
  tag = f"{seed}/{batch}/{q_heads}/{kv_heads}/{d}/{prefix_len}/{max_suffix}"
  q = randn((batch, q_heads, d), f"{tag}/q", dtype)
  pk = randn((prefix_len, kv_heads, d), f"{tag}/pk", dtype)
  pv = randn((prefix_len, kv_heads, d), f"{tag}/pv", dtype)
  sk = randn((batch, max_suffix, kv_heads, d), f"{tag}/sk", dtype)
  sv = randn((batch, max_suffix, kv_heads, d), f"{tag}/sv", dtype)
  lens = jnp.asarray(np.random.default_rng(seed).integers(1, max_suffix + 1, batch), jnp.int32)
  return q, pk, pv, sk, sv, lens


@pytest.mark.parametrize("batch, q_heads, kv_heads, d, prefix_len, max_suffix, dtype, tol", [
    (5, 8, 2, 64, 37, 9, jnp.float32, 1e-5),
    (3, 4, 4, 32, 100, 1, jnp.float32, 1e-5),
    (4, 8, 1, 128, 64, 17, jnp.float32, 1e-5),
    (6, 4, 2, 64, 50, 12, jnp.bfloat16, 2 ** -7),
])
def test_xla_matches_reference(batch, q_heads, kv_heads, d, prefix_len, max_suffix, dtype, tol):
  args = make(prefix_len, batch, q_heads, kv_heads, d, prefix_len, max_suffix, dtype)
  # jitted whole: one compile each instead of op-by-op dispatch (the suite's time budget)
  ref, ref_lse = jax.jit(lambda *a: shared_prefix_attention(*a, implementation="reference", return_lse=True))(*args)
  got, lse = jax.jit(lambda *a: shared_prefix_attention(*a, implementation="xla", return_lse=True))(*args)
  assert got.dtype == dtype
  assert_close(got, ref, tol, "out")
  assert_close(lse, ref_lse, 1e-5, "lse")


def test_bad_input_names_argument():
  q, pk, pv, sk, sv, lens = make(0, 2, 6, 4, 16, 8, 4, jnp.float32)
  with pytest.raises(ValueError, match="q_heads"):
    shared_prefix_attention(q, pk, pv, sk, sv, lens)
  q, pk, pv, sk, sv, lens = make(0, 2, 4, 2, 16, 8, 4, jnp.float32)
  with pytest.raises(ValueError, match="suffix_lens"):
    shared_prefix_attention(q, pk, pv, sk, sv, lens[:1])
  with pytest.raises(ValueError, match="dtype"):
    shared_prefix_attention(q.astype(jnp.bfloat16), pk, pv, sk, sv, lens)
  with pytest.raises(ValueError, match="implementation"):
    shared_prefix_attention(q, pk, pv, sk, sv, lens, implementation="pallas_gpu")


# ------------------------------------------------------------------------- paged, grouped prefix part (engine)

from pallas_kernels.paged_attention import ragged_paged_attention  # noqa: E402
from pallas_kernels.shared_prefix_attention import paged_prefix_attention  # noqa: E402


def make_paged(seed, groups, rows, q_heads, kv_heads, d, num_pages, page_size, max_pages, dtype):
  tag = f"{seed}/{groups}/{rows}/{q_heads}/{kv_heads}/{d}/{num_pages}/{page_size}"
  q = randn((groups, rows, q_heads, d), f"{tag}/q", dtype)
  kp = randn((num_pages, page_size, kv_heads, d), f"{tag}/kp", dtype)
  vp = randn((num_pages, page_size, kv_heads, d), f"{tag}/vp", dtype)
  table = random_page_table(np.random.default_rng(seed), num_pages, groups, max_pages)
  return q, kp, vp, jnp.asarray(table)


@pytest.mark.parametrize("groups, rows, q_heads, kv_heads, d, page_size, lens, window, keys_per_chunk", [
    (3, 5, 8, 2, 32, 4, (12, 37, 0), None, 8),  # a length off the page grid; an unused group
    (2, 4, 4, 4, 16, 8, (64, 8), None, 256),
    (2, 3, 6, 1, 16, 4, (40, 23), 9, 8),  # sliding window: part of the prefix is out of sight
])
def test_paged_prefix_xla_matches_reference(groups, rows, q_heads, kv_heads, d, page_size, lens, window,
                                            keys_per_chunk):
  from pallas_kernels.shared_prefix_attention.xla import paged_prefix_attention as xla_paged

  max_pages = -(-max(lens) // page_size) + 1
  q, kp, vp, table = make_paged(sum(lens), groups, rows, q_heads, kv_heads, d,
                                groups * max_pages + 3, page_size, max_pages, jnp.float32)
  lens = jnp.asarray(lens, jnp.int32)
  qpos = lens[:, None] + jnp.arange(rows, dtype=jnp.int32)[None, :] * 3  # every query after its prefix
  # jitted whole: one compile each instead of op-by-op dispatch (the suite's time budget)
  ref_o, ref_lse = jax.jit(lambda *a: paged_prefix_attention(*a, q_positions=qpos, sliding_window=window,
                                                             implementation="reference"))(q, kp, vp, table, lens)
  got_o, got_lse = jax.jit(lambda *a: xla_paged(*a, q_positions=qpos, sliding_window=window,
                                                keys_per_chunk=keys_per_chunk))(q, kp, vp, table, lens)
  assert_close(got_o, ref_o, 1e-5, "out")
  assert_close(got_lse, ref_lse, 1e-5, "lse")
  empty = np.asarray(lens) == 0
  assert np.all(np.asarray(got_o)[empty] == 0) and np.all(np.isneginf(np.asarray(got_lse)[empty]))


@pytest.mark.parametrize("window", [None, 6])
def test_prefix_plus_suffix_merge_equals_ragged_paged_attention(window):
  """The engine's decomposition: the group's prefix pages once for all its decode rows + each sequence's
  remaining pages (page table shifted, kv_lens reduced) merged by lse == attention over all its pages."""
  rng = np.random.default_rng(0)
  page_size, prefix_pages, hq, hkv, d, num_pages = 4, 3, 4, 2, 16, 32
  kp = randn((num_pages, page_size, hkv, d), f"merge/{window}/kp")
  vp = randn((num_pages, page_size, hkv, d), f"merge/{window}/vp")
  prefix = [5, 17, 2]
  suffix_lens = [1, 6, 9]  # tokens after the prefix, the decode token included
  table = np.zeros((4, 8), np.int32)  # 3 sequences + a padding row
  free = [p for p in rng.permutation(num_pages).tolist() if p not in prefix]
  for s, n in enumerate(suffix_lens):
    own = -(-n // page_size)
    table[s, :prefix_pages + own] = prefix + [free.pop() for _ in range(own)]
  kv_lens = np.asarray([prefix_pages * page_size + n for n in suffix_lens] + [0], np.int32)
  cu = np.asarray([0, 1, 2, 3, 3], np.int32)
  q = randn((5, hq, d), f"merge/{window}/q")  # 3 decode rows + 2 padding rows
  shift = prefix_pages * page_size
  suffix_table = np.zeros_like(table)
  suffix_table[:3, :8 - prefix_pages] = table[:3, prefix_pages:]
  rows = jnp.asarray([[0, 1, 2]])

  @jax.jit
  def both(q, kp, vp):
    full = ragged_paged_attention(q, kp, vp, jnp.asarray(table), jnp.asarray(kv_lens), jnp.asarray(cu), 3,
                                  sliding_window=window, implementation="reference")
    out_s, lse_s = ragged_paged_attention(q, kp, vp, jnp.asarray(suffix_table),
                                          jnp.asarray(np.maximum(kv_lens - shift, 0)), jnp.asarray(cu), 3,
                                          sliding_window=window, return_lse=True, implementation="xla")
    qpos = jnp.asarray(kv_lens[:3] - 1)[None]
    out_p, lse_p = paged_prefix_attention(q[rows], kp, vp, jnp.asarray([prefix], jnp.int32),
                                          jnp.asarray([shift], jnp.int32), q_positions=qpos, sliding_window=window)
    out_pt = jnp.zeros((5, hq, d)).at[rows[0]].set(out_p[0])
    lse_pt = jnp.full((5, hq), -jnp.inf).at[rows[0]].set(lse_p[0])
    return merge_partials(out_pt, lse_pt, out_s, lse_s)[0], full

  out, full = both(q, kp, vp)
  assert_close(out, full, 2e-5, "out")


def test_paged_prefix_bad_input_names_argument():
  q, kp, vp, table = make_paged(0, 2, 3, 4, 2, 16, 12, 4, 2, jnp.float32)
  lens = jnp.asarray([8, 4], jnp.int32)
  with pytest.raises(ValueError, match="prefix_lens"):
    paged_prefix_attention(q, kp, vp, table, lens[:1])
  with pytest.raises(ValueError, match="q_positions"):
    paged_prefix_attention(q, kp, vp, table, lens, sliding_window=4)
  with pytest.raises(ValueError, match="prefix_page_table"):
    paged_prefix_attention(q, kp, vp, table[:1], lens)
  with pytest.raises(ValueError, match="implementation"):
    paged_prefix_attention(q, kp, vp, table, lens, implementation="pallas_tpu")
