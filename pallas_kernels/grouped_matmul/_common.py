"""What every grouped_matmul implementation shares: the row -> group rule, the megablox tile-visit plan the
Pallas kernels walk, padding, and the custom_vjp that turns a (gmm, tgmm) kernel pair into a differentiable op.

Row rule (that of jax.lax.ragged_dot): with ends = cumsum(group_sizes) clipped to M, row r belongs to group
g = #{h : ends[h] <= r}; rows at or past ends[-1] belong to no group and get zeros. Negative sizes count as 0
(they are rejected when group_sizes is concrete; see api.validate_group_sizes).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from pallas_kernels.shapes import pad_axis, round_up  # noqa: F401  (used by the kernels)


def group_bounds(group_sizes, m: int):
  """(starts, ends) int32 [G]: group g owns rows starts[g]:ends[g] (ends clipped to M, sizes below 0 as 0)."""
  sizes = jnp.maximum(group_sizes.astype(jnp.int32), 0)
  ends = jnp.minimum(jnp.cumsum(sizes), m).astype(jnp.int32)
  starts = jnp.concatenate([jnp.zeros((1,), jnp.int32), ends[:-1]])
  return starts, ends


def row_groups(group_sizes, m: int):
  """int32 [M]: each row's group, G for rows past the last group (the reference's view of the rule)."""
  _, ends = group_bounds(group_sizes, m)
  return jnp.sum(ends[None, :] <= jnp.arange(m, dtype=jnp.int32)[:, None], axis=1).astype(jnp.int32)


@dataclasses.dataclass(frozen=True)
class Visits:
  """The tile-visit list (megablox's group metadata), int32 [V] each: visit v covers row tile `tile[v]` for
  group `group[v]`, and only its rows lo[v] <= row < hi[v] (a tile straddling groups is visited once per
  group with that row mask). Visits are ordered by group, so all visits of one group (and, within a group,
  of one tile) are consecutive. V is static (an upper bound); trailing padding visits have an empty mask."""
  tile: jax.Array
  group: jax.Array
  lo: jax.Array
  hi: jax.Array

  def arrays(self):
    return self.tile, self.group, self.lo, self.hi


def visit_plan(group_sizes, m: int, m_padded: int, tm: int, *, tail: bool, visit_empty: bool) -> Visits:
  """The visits of row tiles of `tm` rows over M (padded to m_padded).

  tail=True (gmm): a last pseudo-group G covers rows ends[-1]:m_padded, so every output row is written once
  (zeros there); padding visits are (last tile, group G, empty mask). visit_empty=True (tgmm): a group with
  no rows still gets one visit with an empty mask, so its [K, N] output block is written (as zeros); padding
  visits repeat the last real visit's tile and group with an empty mask (they add nothing)."""
  n_groups = group_sizes.shape[0]
  m_tiles = m_padded // tm
  starts, ends = group_bounds(group_sizes, m)
  if tail:
    starts = jnp.concatenate([starts, ends[-1:]])
    ends = jnp.concatenate([ends, jnp.full((1,), m_padded, jnp.int32)])
  segments = starts.shape[0]
  nonempty = ends > starts
  first = jnp.minimum(starts // tm, m_tiles - 1)
  last = jnp.where(nonempty, (ends - 1) // tm, first)
  count = jnp.where(nonempty, last - first + 1, 1 if visit_empty else 0)
  # Non-empty segments touch at most m_tiles + segments - 1 tiles in all (each boundary inside a tile adds one
  # visit); empty ones add at most one each when visited.
  n_visits = m_tiles + segments - 1 + (segments if visit_empty else 0)
  cum = jnp.cumsum(count)
  v = jnp.arange(n_visits, dtype=jnp.int32)
  seg = jnp.minimum(jnp.searchsorted(cum, v, side="right"), segments - 1).astype(jnp.int32)
  real = v < cum[-1]
  tile = first[seg] + v - (cum[seg] - count[seg])
  lo, hi = starts[seg], ends[seg]
  if tail:
    pad = (m_tiles - 1, n_groups, 0, 0)
  else:
    last_seg = seg[jnp.maximum(cum[-1] - 1, 0)]
    pad = (last[last_seg], last_seg, 0, 0)
  fields = [jnp.where(real, x, p).astype(jnp.int32) for x, p in zip((tile, seg, lo, hi), pad)]
  return Visits(*fields)


def compute_dtype(a, b):
  """The dtype both tiles are multiplied in (a float32 cotangent against bf16 weights: float32)."""
  return jnp.promote_types(a.dtype, b.dtype)


def differentiable(gmm, tgmm):
  """A grouped_matmul(lhs, rhs, group_sizes, out_dtype, options) with the megablox backward, from kernels
  gmm(lhs [M, K], rhs [G, K, N], group_sizes, out_dtype, options) -> [M, N] (with ("transpose_rhs", True)
  in options: lhs [M, N] times rhs[g]^T -> [M, K]) and tgmm(lhs [M, K],
  dout [M, N], group_sizes, out_dtype, options) -> [G, K, N] (per group lhs[rows]^T @ dout[rows]).
  out_dtype and options (a hashable tuple of the implementation's keywords) are static."""

  def primal(lhs, rhs, group_sizes, out_dtype, options):
    return gmm(lhs, rhs, group_sizes, out_dtype, options)

  def fwd(lhs, rhs, group_sizes, out_dtype, options):
    return gmm(lhs, rhs, group_sizes, out_dtype, options), (lhs, rhs, group_sizes)

  def bwd(out_dtype, options, res, dout):
    del out_dtype
    lhs, rhs, group_sizes = res
    # d_lhs[rows of g] = dout[rows] @ rhs[g]^T (rows past the groups get zeros, as their output did); the
    # kernel reads rhs transposed in its blocks, so no transposed copy of the weights is made
    d_lhs = gmm(dout, rhs, group_sizes, jnp.dtype(lhs.dtype), options + (("transpose_rhs", True),))
    d_rhs = tgmm(lhs, dout, group_sizes, jnp.dtype(rhs.dtype), options)
    return d_lhs, d_rhs, None

  op = jax.custom_vjp(primal, nondiff_argnums=(3, 4))
  op.defvjp(fwd, bwd)
  return op
