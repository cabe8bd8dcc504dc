"""pallas_kernels.lse: the one log-sum-exp merge (split-K decode, Hydragen, ring attention) against a softmax
over all keys at once, its gradients against autodiff of that softmax, and empty partials."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels.lse import merge_pair, merge_partials
from testlib import assert_close, randn


def _attend(s, v, mask):
  """Softmax attention of scores s [rows, keys] over the keys in mask -> (out [rows, d], lse [rows])."""
  sm = jnp.where(mask, s, -jnp.inf)
  lse = jax.nn.logsumexp(sm, axis=-1)
  p = jnp.where(mask, jnp.exp(sm - jnp.where(jnp.isneginf(lse), 0.0, lse)[:, None]), 0.0)
  return p @ v, lse


def _parts(s, v, bounds):
  keys = jnp.arange(s.shape[1])
  return [_attend(s, v, (keys >= lo) & (keys < hi)) for lo, hi in bounds]


def test_merge_partials_equals_softmax_over_all_keys_with_an_empty_split():
  s, v = randn((3, 10), "lse/s"), randn((10, 4), "lse/v")
  parts = _parts(s, v, [(0, 4), (4, 4), (4, 10)])  # the middle split sees no key
  o = jnp.stack([p[0] for p in parts], axis=1)
  o = o.at[:, 1].set(jnp.nan)  # whatever an empty partial holds never leaks
  lse = jnp.stack([p[1] for p in parts], axis=1)
  out, out_lse = merge_partials(o, lse, axis=1)
  full, full_lse = _attend(s, v, jnp.ones(10, bool))
  assert_close(out, full, 1e-6, "out")
  assert_close(out_lse, full_lse, 1e-6, "lse")


def test_all_empty_rows_give_zero_and_minus_inf():
  o = randn((2, 3, 5), "lse/empty")
  out, lse = merge_partials(o, jnp.full((2, 3), -jnp.inf), axis=-1)
  assert np.all(np.asarray(out) == 0) and np.all(np.isneginf(np.asarray(lse)))
  out, lse = merge_pair(o[:, 0], jnp.full((2,), -jnp.inf), o[:, 1], jnp.full((2,), -jnp.inf))
  assert np.all(np.asarray(out) == 0) and np.all(np.isneginf(np.asarray(lse)))


def test_merge_pair_and_its_gradients_match_the_full_softmax():
  """The gradient of a loss of the merged result, w.r.t. scores and values, equals autodiff of one softmax."""
  s, v = randn((4, 12), "lse/gs"), randn((12, 3), "lse/gv")
  w, w_lse = randn((4, 3), "lse/w"), randn((4,), "lse/wl")

  def merged(s, v):
    (oa, la), (ob, lb) = _parts(s, v, [(0, 5), (5, 12)])
    o, lse = merge_pair(oa, la, ob, lb)
    return jnp.sum(o * w) + jnp.sum(lse * w_lse)

  def full(s, v):
    o, lse = _attend(s, v, jnp.ones(12, bool))
    return jnp.sum(o * w) + jnp.sum(lse * w_lse)

  assert_close(jax.jit(merged)(s, v), jax.jit(full)(s, v), 1e-6, "loss")
  grads, grads_ref = (jax.jit(jax.grad(f, (0, 1)))(s, v) for f in (merged, full))
  for name, g, g_ref in zip(("ds", "dv"), grads, grads_ref):
    assert np.all(np.isfinite(np.asarray(g))), name
    assert_close(g, g_ref, 1e-5, name)
