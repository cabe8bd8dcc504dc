"""Exact combination of attention results computed over disjoint key sets, by their log-sum-exps."""

from __future__ import annotations

import jax.numpy as jnp


def merge_partials(out_a, lse_a, out_b, lse_b):
  """out_* [..., head_dim] normalised over their own keys, lse_* [...] (float32, -inf: no key).

  Returns (out, lse) over the union of the keys; rows with no key in either part stay 0 / -inf.
  """
  lse = jnp.logaddexp(lse_a, lse_b)
  safe = jnp.where(jnp.isneginf(lse), 0.0, lse)
  w_a = jnp.exp(lse_a - safe)[..., None]
  w_b = jnp.exp(lse_b - safe)[..., None]
  out = out_a.astype(jnp.float32) * w_a + out_b.astype(jnp.float32) * w_b
  return out, lse
