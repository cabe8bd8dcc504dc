"""Hydragen shared-prefix attention equals every sequence attending to its own prefix + suffix copy.

Tolerances: float32 inputs, float32 math on both sides; only summation order differs (1e-5). bfloat16
inputs are upcast identically on both sides, so the bound is the final cast to bfloat16 (one ulp, 2^-8).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.shared_prefix_attention import merge_partials, shared_prefix_attention


def make(key, batch, q_heads, kv_heads, d, prefix_len, max_suffix, dtype):
  ks = jax.random.split(key, 6)
  q = jax.random.normal(ks[0], (batch, q_heads, d), dtype)
  pk = jax.random.normal(ks[1], (prefix_len, kv_heads, d), dtype)
  pv = jax.random.normal(ks[2], (prefix_len, kv_heads, d), dtype)
  sk = jax.random.normal(ks[3], (batch, max_suffix, kv_heads, d), dtype)
  sv = jax.random.normal(ks[4], (batch, max_suffix, kv_heads, d), dtype)
  lens = jax.random.randint(ks[5], (batch,), 1, max_suffix + 1)
  return q, pk, pv, sk, sv, lens


@pytest.mark.parametrize("batch, q_heads, kv_heads, d, prefix_len, max_suffix, dtype, tol", [
    (5, 8, 2, 64, 37, 9, jnp.float32, 1e-5),
    (3, 4, 4, 32, 100, 1, jnp.float32, 1e-5),
    (4, 8, 1, 128, 64, 17, jnp.float32, 1e-5),
    (6, 4, 2, 64, 50, 12, jnp.bfloat16, 2 ** -7),
])
def test_xla_matches_reference(batch, q_heads, kv_heads, d, prefix_len, max_suffix, dtype, tol):
  args = make(jax.random.key(prefix_len), batch, q_heads, kv_heads, d, prefix_len, max_suffix, dtype)
  ref, ref_lse = shared_prefix_attention(*args, implementation="reference", return_lse=True)
  got, lse = shared_prefix_attention(*args, implementation="xla", return_lse=True)
  assert got.dtype == dtype
  np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(ref, np.float32), atol=tol, rtol=tol)
  np.testing.assert_allclose(lse, ref_lse, atol=1e-4, rtol=1e-5)


def test_merge_is_exact_and_handles_empty_parts():
  key = jax.random.key(0)
  s = jax.random.normal(key, (3, 10))
  v = jax.random.normal(jax.random.key(1), (10, 4))

  def part(mask):
    sm = jnp.where(mask, s, -jnp.inf)
    lse = jax.nn.logsumexp(sm, axis=-1)
    safe = jnp.where(jnp.isneginf(lse), 0.0, lse)
    return jnp.where(mask, jnp.exp(sm - safe[:, None]), 0.0) @ v, lse

  split = jnp.arange(10) < 4
  out, lse = merge_partials(*part(split), *part(~split))
  full, full_lse = part(jnp.ones(10, bool))
  np.testing.assert_allclose(out, full, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(lse, full_lse, rtol=1e-6)
  none = jnp.zeros(10, bool)
  out, lse = merge_partials(*part(none), *part(none))
  assert np.all(np.asarray(out) == 0) and np.all(np.isneginf(np.asarray(lse)))


def test_bad_input_names_argument():
  q, pk, pv, sk, sv, lens = make(jax.random.key(0), 2, 6, 4, 16, 8, 4, jnp.float32)
  with pytest.raises(ValueError, match="q_heads"):
    shared_prefix_attention(q, pk, pv, sk, sv, lens)
  q, pk, pv, sk, sv, lens = make(jax.random.key(0), 2, 4, 2, 16, 8, 4, jnp.float32)
  with pytest.raises(ValueError, match="suffix_lens"):
    shared_prefix_attention(q, pk, pv, sk, sv, lens[:1])
  with pytest.raises(ValueError, match="dtype"):
    shared_prefix_attention(q.astype(jnp.bfloat16), pk, pv, sk, sv, lens)
  with pytest.raises(ValueError, match="implementation"):
    shared_prefix_attention(q, pk, pv, sk, sv, lens, implementation="pallas_gpu")
