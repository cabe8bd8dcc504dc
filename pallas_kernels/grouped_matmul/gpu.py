"""grouped_matmul for NVIDIA GPUs ("pallas_gpu", Pallas Triton), megablox-style.

gmm: grid (tile visits, N blocks). The visit list (_common.visit_plan: tile, group, row range per visit) comes
in as int32 inputs that each program reads as scalars. A program multiplies its visit's lhs row tile by its
group's rhs column block, block_k rows at a time, accumulating in float32, and stores only the visit's rows
(a masked store): the visits of a tile that straddles groups write disjoint rows, so they never race. Rows
past the groups are a pseudo-group whose visits store zeros without a matmul; padding visits store nothing.

tgmm (rhs's gradient, per group lhs[rows]^T @ dout[rows] -> [G, K, N]): grid (G, K blocks, N blocks); a
program loops over its group's row tiles (a dynamic trip count from the group's bounds) with row masks, so a
group with no rows writes zeros. The backward's d_lhs (dout @ rhs[g]^T) is the gmm kernel reading rhs blocks
transposed (no transposed copy of the weights).

Triton tiles must be powers of two: M is padded to the row tile (a copy of lhs), and K, N to their blocks (a
copy of rhs only when they are not multiples of them).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.grouped_matmul import _common as C
from pallas_kernels.op import requires_backend
from pallas_kernels.validation import check_block

NAME = "pallas_gpu"
_MIN_DIM = 16  # Triton's smallest dot tile

unavailable_reason = requires_backend("gpu", NAME)


def _dot(a, b, dtype):
  prec = lax.Precision.HIGHEST if dtype == jnp.float32 else None
  return jnp.dot(a.astype(dtype), b.astype(dtype), precision=prec, preferred_element_type=jnp.float32)


def _block(size: int, cap: int) -> int:
  """A power-of-two block >= 16 for a dimension of `size`, at most cap."""
  return min(cap, max(_MIN_DIM, pl.next_power_of_2(size)))


def _gmm_kernel(tile_ref, group_ref, lo_ref, hi_ref, lhs_ref, rhs_ref, o_ref, *, n_groups, tm, bk, k_steps, dtype,
                transpose_rhs):
  v = pl.program_id(0)
  g, row0 = group_ref[v], tile_ref[v] * tm
  rows = row0 + lax.broadcasted_iota(jnp.int32, (tm, o_ref.shape[1]), 0)
  mask = (rows >= lo_ref[v]) & (rows < hi_ref[v])
  out = o_ref.at[pl.ds(row0, tm), :]

  @pl.when(g < n_groups)
  def _():
    def body(i, acc):
      k0 = pl.multiple_of(i * bk, bk)
      x = lhs_ref[pl.ds(row0, tm), pl.ds(k0, bk)]
      if transpose_rhs:
        return acc + _dot(x, rhs_ref[g, :, pl.ds(k0, bk)].T, dtype)
      return acc + _dot(x, rhs_ref[g, pl.ds(k0, bk), :], dtype)

    acc = lax.fori_loop(0, k_steps, body, jnp.zeros(mask.shape, jnp.float32))
    plgpu.store(out, acc.astype(o_ref.dtype), mask=mask)

  @pl.when(g >= n_groups)  # rows past the groups (and padding visits, whose mask is empty)
  def _():
    plgpu.store(out, jnp.zeros(mask.shape, o_ref.dtype), mask=mask)


def _options(options):
  o = dict(options) if options else {}
  return (o.get("tm", 64), o.get("tk", 64), o.get("tn", 128), o.get("interpret", False), o.get("num_warps", 4),
          o.get("num_stages", 2), o.get("transpose_rhs", False))


def _gmm(lhs, rhs, group_sizes, out_dtype, options):
  tm, tk, tn, interpret, num_warps, num_stages, transpose_rhs = _options(options)
  m, k = lhs.shape
  n_groups = rhs.shape[0]
  n = rhs.shape[1] if transpose_rhs else rhs.shape[2]
  tm, bk, bn = _block(m, tm), _block(k, tk), _block(n, tn)
  mp, kp, np_ = C.round_up(m, tm), C.round_up(k, bk), C.round_up(n, bn)
  lhs = C.pad_axis(C.pad_axis(lhs, 0, mp), 1, kp)
  k_axis, n_axis = (2, 1) if transpose_rhs else (1, 2)
  rhs = C.pad_axis(C.pad_axis(rhs, k_axis, kp), n_axis, np_)
  rhs_spec = (pl.BlockSpec((n_groups, bn, kp), lambda v, j: (0, j, 0)) if transpose_rhs
              else pl.BlockSpec((n_groups, kp, bn), lambda v, j: (0, 0, j)))
  plan = C.visit_plan(group_sizes, m, mp, tm, tail=True, visit_empty=False)
  n_visits = plan.tile.shape[0]
  meta = pl.BlockSpec((n_visits,), lambda v, j: (0,))
  kernel = functools.partial(_gmm_kernel, n_groups=n_groups, tm=tm, bk=bk, k_steps=kp // bk,
                             dtype=C.compute_dtype(lhs, rhs), transpose_rhs=transpose_rhs)
  out = pl.pallas_call(
      kernel,
      grid=(n_visits, np_ // bn),
      in_specs=[meta] * 4 + [pl.BlockSpec((mp, kp), lambda v, j: (0, 0)), rhs_spec],
      out_specs=pl.BlockSpec((mp, bn), lambda v, j: (0, j)),
      out_shape=jax.ShapeDtypeStruct((mp, np_), out_dtype),
      compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages),
      interpret=bool(interpret),
      name="grouped_matmul",
  )(*plan.arrays(), lhs, rhs)
  return out[:m, :n]


def _tgmm_kernel(starts_ref, ends_ref, lhs_ref, d_ref, o_ref, *, tm, dtype):
  g, kb = pl.program_id(0), pl.program_id(1)
  lo, hi = starts_ref[g], ends_ref[g]
  bk = o_ref.shape[0]
  first = lo // tm
  stop = jnp.where(hi > lo, (hi - 1) // tm + 1, first)

  def body(t, acc):
    row0 = t * tm
    rows = row0 + lax.broadcasted_iota(jnp.int32, (tm, 1), 0)
    mine = (rows >= lo) & (rows < hi)
    # both operands masked, so a non-finite value in another group's row cannot leak into this group
    x = jnp.where(mine, lhs_ref[pl.ds(row0, tm), pl.ds(kb * bk, bk)], 0)
    d = jnp.where(mine, d_ref[pl.ds(row0, tm), :], 0)
    return acc + _dot(x.T, d, dtype)

  acc = lax.fori_loop(first, stop, body, jnp.zeros(o_ref.shape, jnp.float32))
  o_ref[...] = acc.astype(o_ref.dtype)


def _tgmm(lhs, dout, group_sizes, out_dtype, options):
  tm, tk, tn, interpret, num_warps, num_stages, _ = _options(options)
  m, k = lhs.shape
  n, n_groups = dout.shape[1], group_sizes.shape[0]
  tm, bk, bn = _block(m, tm), _block(k, tk), _block(n, tn)
  mp, kp, np_ = C.round_up(m, tm), C.round_up(k, bk), C.round_up(n, bn)
  lhs = C.pad_axis(C.pad_axis(lhs, 0, mp), 1, kp)
  dout = C.pad_axis(C.pad_axis(dout, 0, mp), 1, np_)
  starts, ends = C.group_bounds(group_sizes, m)
  bounds = pl.BlockSpec((n_groups,), lambda g, i, j: (0,))
  out = pl.pallas_call(
      functools.partial(_tgmm_kernel, tm=tm, dtype=C.compute_dtype(lhs, dout)),
      grid=(n_groups, kp // bk, np_ // bn),
      in_specs=[bounds, bounds, pl.BlockSpec((mp, kp), lambda g, i, j: (0, 0)),
                pl.BlockSpec((mp, bn), lambda g, i, j: (0, j))],
      out_specs=pl.BlockSpec((None, bk, bn), lambda g, i, j: (g, i, j)),
      out_shape=jax.ShapeDtypeStruct((n_groups, kp, np_), out_dtype),
      compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages),
      interpret=bool(interpret),
      name="grouped_matmul_tgmm",
  )(starts, ends, lhs, dout)
  return out[:, :k, :n]


_op = C.differentiable(_gmm, _tgmm)


def _settings(interpret, tm, tk, tn, num_warps, num_stages):
  for name, value in (("tm", tm), ("tk", tk), ("tn", tn)):
    check_block(name, value, implementation=NAME, minimum=_MIN_DIM, power_of_two=True)
  return (("interpret", interpret), ("tm", tm), ("tk", tk), ("tn", tn), ("num_warps", num_warps),
          ("num_stages", num_stages))


def grouped_matmul(lhs, rhs, group_sizes, *, preferred_element_type=None, interpret=False, tm: int = 64,
                   tk: int = 64, tn: int = 128, num_warps: int = 4, num_stages: int = 2):
  """Same contract as `pallas_kernels.grouped_matmul`. tm: rows per tile; tk: K rows per step; tn: output
  columns per program (caps, powers of two >= 16; small dimensions use the next power of two)."""
  options = _settings(interpret, tm, tk, tn, num_warps, num_stages)
  return _op(lhs, rhs, group_sizes, jnp.dtype(preferred_element_type or lhs.dtype), options)


def tgmm(lhs, dout, group_sizes, *, preferred_element_type=None, interpret=False, tm: int = 64, tk: int = 64,
         tn: int = 128, num_warps: int = 4, num_stages: int = 2):
  """[G, K, N]: per group lhs[rows]^T @ dout[rows], zeros for a group with no rows (the kernel of d rhs)."""
  options = _settings(interpret, tm, tk, tn, num_warps, num_stages)
  return _tgmm(lhs, dout, group_sizes, jnp.dtype(preferred_element_type or lhs.dtype), options)
