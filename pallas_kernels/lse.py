"""Exact combination, by log-sum-exp, of attention results computed over disjoint key sets.

Used by split-K decode (FlashDecoding partials), Hydragen (shared prefix + own suffix) and ring attention (one
partial per ring step). A partial is (out normalised over its own keys, lse = log sum exp of its scores, -inf
when it saw no key). Merged rows with no key in any partial get out 0 and lse -inf, never NaN, whatever an
empty partial's out holds. Gradients are exact: the result does not depend on the max used for stability,
so it is not differentiated.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def online_step(m, l, s):
  """One block of scores s [..., keys] (-inf: hidden) into an online softmax's running max m and sum l [...].

  Returns (m_new, l_new, p, corr): p = exp(s - m_new) for this block's P V product and corr = exp(m - m_new)
  to rescale the running accumulator (acc_new = corr * acc + p v). Rows that saw no key keep m = -inf."""
  m_new = jnp.maximum(m, s.max(-1))
  m_safe = jnp.where(m_new == -jnp.inf, 0.0, m_new)
  p = jnp.exp(s - m_safe[..., None])
  corr = jnp.exp(m - m_safe)
  return m_new, corr * l + p.sum(-1), p, corr


def normalize(acc, l, m):
  """An online softmax's (acc = sum p v [..., d], l = sum p, m = max [...]) -> (out = acc / l, lse = m + log l);
  rows that saw no key (l == 0) get out 0 and lse -inf."""
  empty = l == 0.0
  l_safe = jnp.where(empty, 1.0, l)
  return acc / l_safe[..., None], jnp.where(empty, -jnp.inf, m + jnp.log(l_safe))


def merge_partials(o, lse, axis: int):
  """Merges the partials stacked along `axis`.

  o: [..., S, ..., head_dim] partial outputs; lse: o's shape minus head_dim (float32); `axis`: the split axis
  of lse (negative axes count from lse's end). Returns (o float32, lse float32) with that axis removed.
  """
  axis = axis % lse.ndim
  lse = lse.astype(jnp.float32)
  m = jax.lax.stop_gradient(jnp.max(lse, axis=axis, keepdims=True))
  m_safe = jnp.where(jnp.isfinite(m), m, 0.0)
  w = jnp.exp(lse - m_safe)  # exactly 0 for empty partials
  total = jnp.sum(w, axis=axis)
  out = jnp.sum(w[..., None] * jnp.where(w[..., None] > 0, o.astype(jnp.float32), 0.0), axis=axis)
  empty = total == 0.0
  out = out / jnp.where(empty, 1.0, total)[..., None]
  lse_out = jnp.where(empty, -jnp.inf, jnp.squeeze(m_safe, axis) + jnp.log(jnp.where(empty, 1.0, total)))
  return out, lse_out


def merge_pair(o_a, lse_a, o_b, lse_b):
  """Two partials over disjoint keys: o_* [..., head_dim], lse_* [...]. Returns (o float32, lse float32)."""
  return merge_partials(jnp.stack([o_a.astype(jnp.float32), o_b.astype(jnp.float32)]),
                        jnp.stack([lse_a.astype(jnp.float32), lse_b.astype(jnp.float32)]), axis=0)
