"""grouped_matmul, obviously correct: every row's group id (the ragged_dot rule), then one float32 matmul per
group with the other rows masked to zero (G full matmuls: a check, not a fast path). Differentiable by JAX."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels.grouped_matmul._common import row_groups
from pallas_kernels.op import always_available

unavailable_reason = always_available
_HI = jax.lax.Precision.HIGHEST


def grouped_matmul(lhs, rhs, group_sizes, *, preferred_element_type=None, interpret=False):
  del interpret
  gid = row_groups(group_sizes, lhs.shape[0])
  x = lhs.astype(jnp.float32)
  out = jnp.zeros((lhs.shape[0], rhs.shape[2]), jnp.float32)
  for g in range(rhs.shape[0]):
    mine = (gid == g)[:, None]
    out += jnp.where(mine, jnp.dot(x, rhs[g].astype(jnp.float32), precision=_HI), 0.0)
  return out.astype(preferred_element_type or lhs.dtype)


def tgmm(lhs, dout, group_sizes, *, preferred_element_type=None):
  """[G, K, N]: per group lhs[rows]^T @ dout[rows] (zeros for a group with no rows); rhs's gradient."""
  gid = row_groups(group_sizes, lhs.shape[0])
  onehot = (gid[:, None] == jnp.arange(group_sizes.shape[0])[None, :]).astype(jnp.float32)  # [M, G]
  out = jnp.einsum("mg,mk,mn->gkn", onehot, lhs.astype(jnp.float32), dout.astype(jnp.float32), precision=_HI)
  return out.astype(preferred_element_type or lhs.dtype)
