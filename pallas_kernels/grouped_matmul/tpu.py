"""grouped_matmul for TPUs ("pallas_tpu", Pallas Mosaic), megablox-style.

gmm: grid (N blocks, tile visits, K steps). The visit list (_common.visit_plan: tile, group, row range per
visit) is scalar-prefetched into SMEM (pltpu.PrefetchScalarGridSpec), so the BlockSpec index maps DMA the
visit's lhs row tile and its group's rhs block. A float32 accumulator lives in VMEM; at the last K step the
visit's rows (a row mask, for tiles that straddle groups) are written into the output tile, which stays
resident in VMEM across the consecutive visits of one tile. Rows past the groups are a pseudo-group that
writes zeros without a matmul. The backward's d_lhs (dout @ rhs[g]^T) is the same kernel reading rhs blocks
transposed (no transposed copy of the weights).

tgmm (rhs's gradient, per group lhs[rows]^T @ dout[rows] -> [G, K, N]): grid (K blocks, N blocks, visits); the
output block of the visit's group stays resident across that group's consecutive visits, zeroed at its first
and written at its last; a group with no rows gets one empty visit, so its block is written as zeros. lhs
enters transposed ([K, M], an XLA copy, as megablox's tgmm takes it) so the MXU sees a plain matmul.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.grouped_matmul import _common as C
from pallas_kernels.mosaic import LANES, interpret_params, mxu_dot
from pallas_kernels.op import requires_backend
from pallas_kernels.validation import check_block

NAME = "pallas_tpu"
_ROWS = 16  # sublane multiple that suits f32 and bf16 row tiles

unavailable_reason = requires_backend("tpu", NAME, interpret_mode="TPU interpret mode (pltpu.InterpretParams)")


def _lane_block(size: int, cap: int) -> int:
  """A lane-multiple block dividing `size` (at most cap), else the full extent (always legal)."""
  for b in (1024, 512, 256, 128):
    if b <= cap and size % b == 0:
      return b
  return size


def _row_mask(tile_ref, lo_ref, hi_ref, v, shape, axis: int, tm: int):
  rows = tile_ref[v] * tm + lax.broadcasted_iota(jnp.int32, shape, axis)
  return (rows >= lo_ref[v]) & (rows < hi_ref[v])


def _gmm_kernel(tile_ref, group_ref, lo_ref, hi_ref, lhs_ref, rhs_ref, o_ref, acc_ref, *, n_groups, tm, k_steps,
                dtype, transpose_rhs):
  v, k = pl.program_id(1), pl.program_id(2)

  @pl.when(k == 0)
  def _():
    acc_ref[...] = jnp.zeros_like(acc_ref)

  @pl.when(group_ref[v] < n_groups)  # the rows-past-the-groups pseudo-group only writes zeros
  def _():
    acc_ref[...] += mxu_dot(lhs_ref[...].astype(dtype), rhs_ref[...].astype(dtype), trans_b=transpose_rhs)

  @pl.when(k == k_steps - 1)
  def _():
    mask = _row_mask(tile_ref, lo_ref, hi_ref, v, o_ref.shape, 0, tm)
    o_ref[...] = jnp.where(mask, acc_ref[...].astype(o_ref.dtype), o_ref[...])


def _options(options):
  return dict(options) if options else {}


def _gmm(lhs, rhs, group_sizes, out_dtype, options):
  o = _options(options)
  tm, tk, tn, interpret = o.get("tm", 128), o.get("tk", 512), o.get("tn", 512), o.get("interpret", False)
  transpose_rhs = o.get("transpose_rhs", False)
  m, k = lhs.shape
  n_groups = rhs.shape[0]
  n = rhs.shape[1] if transpose_rhs else rhs.shape[2]
  tm = min(tm, C.round_up(m, _ROWS))
  mp = C.round_up(m, tm)
  bk, bn = _lane_block(k, tk), _lane_block(n, tn)
  lhs = C.pad_axis(lhs, 0, mp)
  plan = C.visit_plan(group_sizes, m, mp, tm, tail=True, visit_empty=False)
  n_visits, k_steps = plan.tile.shape[0], k // bk
  last_group = n_groups - 1

  def lhs_map(j, v, kk, tile, group, lo, hi):
    return tile[v], kk

  def rhs_map(j, v, kk, tile, group, lo, hi):
    g = jnp.minimum(group[v], last_group)
    return (g, j, kk) if transpose_rhs else (g, kk, j)

  def out_map(j, v, kk, tile, group, lo, hi):
    return tile[v], j

  kernel = functools.partial(_gmm_kernel, n_groups=n_groups, tm=tm, k_steps=k_steps,
                             dtype=C.compute_dtype(lhs, rhs), transpose_rhs=transpose_rhs)
  rhs_block = (None, bn, bk) if transpose_rhs else (None, bk, bn)
  out = pl.pallas_call(
      kernel,
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=4, grid=(n // bn, n_visits, k_steps),
          in_specs=[pl.BlockSpec((tm, bk), lhs_map), pl.BlockSpec(rhs_block, rhs_map)],
          out_specs=pl.BlockSpec((tm, bn), out_map),
          scratch_shapes=[pltpu.VMEM((tm, bn), jnp.float32)]),
      out_shape=jax.ShapeDtypeStruct((mp, n), out_dtype),
      compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "arbitrary", "arbitrary")),
      interpret=interpret_params(interpret),
      name="grouped_matmul",
  )(*plan.arrays(), lhs, rhs)
  return out[:m]


def _tgmm_kernel(tile_ref, group_ref, lo_ref, hi_ref, lhs_t_ref, d_ref, o_ref, acc_ref, *, tm, n_visits, dtype):
  v = pl.program_id(2)
  g = group_ref[v]
  first = (v == 0) | (g != group_ref[jnp.maximum(v - 1, 0)])
  last = (v == n_visits - 1) | (g != group_ref[jnp.minimum(v + 1, n_visits - 1)])

  @pl.when(first)
  def _():
    acc_ref[...] = jnp.zeros_like(acc_ref)

  # both operands masked, so a non-finite value in another group's row cannot leak into this group
  x = jnp.where(_row_mask(tile_ref, lo_ref, hi_ref, v, lhs_t_ref.shape, 1, tm), lhs_t_ref[...].astype(dtype), 0)
  d = jnp.where(_row_mask(tile_ref, lo_ref, hi_ref, v, d_ref.shape, 0, tm), d_ref[...].astype(dtype), 0)
  acc_ref[...] += mxu_dot(x, d)

  @pl.when(last)
  def _():
    o_ref[...] = acc_ref[...].astype(o_ref.dtype)


def _tgmm(lhs, dout, group_sizes, out_dtype, options):
  o = _options(options)
  tm, tk, tn, interpret = o.get("tm", 128), o.get("tk", 512), o.get("tn", 512), o.get("interpret", False)
  m, k = lhs.shape
  n, n_groups = dout.shape[1], group_sizes.shape[0]
  # rows are the lane dimension of lhs^T's block: a lane multiple, or all rows in one tile
  tm = C.round_up(m, _ROWS) if m <= max(tm, LANES) else C.round_up(max(tm, LANES), LANES)
  mp = C.round_up(m, tm)
  bk, bn = _lane_block(k, tk), _lane_block(n, tn)
  lhs_t = C.pad_axis(lhs, 0, mp).T
  dout = C.pad_axis(dout, 0, mp)
  plan = C.visit_plan(group_sizes, m, mp, tm, tail=False, visit_empty=True)
  n_visits = plan.tile.shape[0]
  kernel = functools.partial(_tgmm_kernel, tm=tm, n_visits=n_visits, dtype=C.compute_dtype(lhs, dout))
  return pl.pallas_call(
      kernel,
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=4, grid=(k // bk, n // bn, n_visits),
          in_specs=[pl.BlockSpec((bk, tm), lambda i, j, v, tile, *_: (i, tile[v])),
                    pl.BlockSpec((tm, bn), lambda i, j, v, tile, *_: (tile[v], j))],
          out_specs=pl.BlockSpec((None, bk, bn), lambda i, j, v, tile, group, *_: (group[v], i, j)),
          scratch_shapes=[pltpu.VMEM((bk, bn), jnp.float32)]),
      out_shape=jax.ShapeDtypeStruct((n_groups, k, n), out_dtype),
      compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "arbitrary")),
      interpret=interpret_params(interpret),
      name="grouped_matmul_tgmm",
  )(*plan.arrays(), lhs_t, dout)


_op = C.differentiable(_gmm, _tgmm)


def _tiles(tm, tk, tn):
  check_block("tm", tm, implementation=NAME, minimum=_ROWS, multiple_of=_ROWS)
  check_block("tk", tk, implementation=NAME, minimum=LANES, multiple_of=LANES)
  check_block("tn", tn, implementation=NAME, minimum=LANES, multiple_of=LANES)


def grouped_matmul(lhs, rhs, group_sizes, *, preferred_element_type=None, interpret=False, tm: int = 128,
                   tk: int = 512, tn: int = 512):
  """Same contract as `pallas_kernels.grouped_matmul`. tm: rows per tile (multiple of 16; the backward's tgmm
  uses a lane multiple, or all rows when M is small); tk, tn: caps on the K and N blocks (multiples of 128;
  a dimension no lane multiple divides is one full block)."""
  _tiles(tm, tk, tn)
  options = (("interpret", interpret), ("tm", tm), ("tk", tk), ("tn", tn))
  return _op(lhs, rhs, group_sizes, jnp.dtype(preferred_element_type or lhs.dtype), options)


def tgmm(lhs, dout, group_sizes, *, preferred_element_type=None, interpret=False, tm: int = 128, tk: int = 512,
         tn: int = 512):
  """[G, K, N]: per group lhs[rows]^T @ dout[rows], zeros for a group with no rows (the kernel of d rhs)."""
  _tiles(tm, tk, tn)
  options = (("interpret", interpret), ("tm", tm), ("tk", tk), ("tn", tn))
  return _tgmm(lhs, dout, group_sizes, jnp.dtype(preferred_element_type or lhs.dtype), options)
