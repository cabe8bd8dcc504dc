"""quantized_matmul for TPUs ("pallas_tpu", Pallas Mosaic): grid (row tiles, column tiles, K steps), a float32
accumulator in VMEM. Each step DMAs one [block_k, block_n] tile of codes (uint8) into VMEM, unpacks it there
(mask / shift for bits=4), dequantizes it with the scales and zero points of the groups it covers and feeds
the MXU. Only codes travel from HBM; the float weight never exists beyond one tile in VMEM.

A step covers part of one group (one scale row, broadcast) or several whole groups (their scale rows spread
over the tile's rows by a one-hot [block_k, groups] matmul on the MXU, which keeps the tile 2D).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.mosaic import LANES, interpret_params, mxu_dot
from pallas_kernels.op import requires_backend
from pallas_kernels.quantized_matmul import _common as C

NAME = "pallas_tpu"
_ROWS = 16  # sublane multiple that suits f32 and bf16 row tiles

unavailable_reason = requires_backend("tpu", NAME, interpret_mode="TPU interpret mode (pltpu.InterpretParams)")


def _group_rows_of_tile(s_ref, z_ref, k, block_k, rows_per_group):
  """(scale, zero) for the tile's rows: [1, bn] when the tile lies in one group, else [block_k, bn]."""
  if rows_per_group >= block_k:
    g = lax.div(k * block_k, rows_per_group)  # non-negative: truncation (jnp's // lowers a sign op)
    return s_ref[pl.ds(g, 1), :].astype(jnp.float32), z_ref[pl.ds(g, 1), :].astype(jnp.float32)
  per_tile = block_k // rows_per_group
  start = pl.multiple_of(k * per_tile, per_tile)
  row = lax.div(lax.broadcasted_iota(jnp.int32, (block_k, per_tile), 0), rows_per_group)
  onehot = (row == lax.broadcasted_iota(jnp.int32, (block_k, per_tile), 1)).astype(jnp.float32)
  spread = lambda ref: mxu_dot(onehot, ref[pl.ds(start, per_tile), :].astype(jnp.float32))  # noqa: E731
  return spread(s_ref), spread(z_ref)


def _kernel(*refs, n_parts, block_k, rows_per_group, steps, bits, compute_dtype):
  x_refs, (w_ref, s_ref, z_ref, o_ref, acc_ref) = refs[:n_parts], refs[n_parts:]
  k = pl.program_id(2)

  @pl.when(k == 0)
  def _():
    acc_ref[...] = jnp.zeros_like(acc_ref)

  s, z = _group_rows_of_tile(s_ref, z_ref, k, block_k, rows_per_group)
  w = w_ref[...].astype(jnp.int32)
  planes = (w & 0xF, w >> 4) if bits == 4 else (w,)
  for x_ref, codes in zip(x_refs, planes):
    deq = ((codes.astype(jnp.float32) - z) * s).astype(compute_dtype)
    acc_ref[...] += mxu_dot(x_ref[...].astype(compute_dtype), deq)

  @pl.when(k == steps - 1)
  def _():
    o_ref[...] = acc_ref[...].astype(o_ref.dtype)


def _block_k(kc: int, rows: int, cap: int) -> int:
  """Stored code rows per step: a lane multiple dividing kc that lies within one group or covers whole ones,
  else all of kc (a full-extent block is always legal)."""
  for b in (512, 256, 128):
    if b <= max(cap, LANES) and kc % b == 0 and (rows % b == 0 or b % rows == 0):
      return b
  return kc


def quantized_matmul(x, w, scales, zeros, *, bits, group_size, interpret=False, block_m: int = 128,
                     block_n: int = 256, block_k: int = 512):
  """Same contract as `pallas_kernels.quantized_matmul`. block_m: row tile cap (multiple of 16); block_n:
  output column tile (multiple of 128; N is padded to one, a copy for odd N); block_k: code rows per step cap."""
  if block_m % _ROWS or block_n % LANES:
    raise ValueError(f"{NAME}: block_m must be a multiple of {_ROWS} and block_n of {LANES}, got "
                     f"block_m={block_m}, block_n={block_n}")
  m, n = x.shape[0], w.shape[1]
  parts = C.x_parts(x, bits)
  rows = C.group_rows(bits, group_size)
  bm = min(block_m, C.round_up(m, _ROWS))
  bn = block_n if C.round_up(n, LANES) % block_n == 0 else LANES
  mp, np_ = C.round_up(m, bm), C.round_up(n, bn)
  parts, w, scales, zeros = C.pad_tiles(parts, w, scales, zeros, m=mp, n=np_)
  kc, groups = w.shape[0], scales.shape[0]
  bk = _block_k(kc, rows, block_k)
  steps = kc // bk
  kernel = functools.partial(_kernel, n_parts=len(parts), block_k=bk, rows_per_group=rows, steps=steps, bits=bits,
                             compute_dtype=x.dtype)
  out = pl.pallas_call(
      kernel,
      grid=(mp // bm, np_ // bn, steps),
      in_specs=[pl.BlockSpec((bm, bk), lambda i, j, k: (i, k)) for _ in parts] + [
          pl.BlockSpec((bk, bn), lambda i, j, k: (k, j)),
          pl.BlockSpec((groups, bn), lambda i, j, k: (0, j)),
          pl.BlockSpec((groups, bn), lambda i, j, k: (0, j)),
      ],
      out_specs=pl.BlockSpec((bm, bn), lambda i, j, k: (i, j)),
      out_shape=jax.ShapeDtypeStruct((mp, np_), x.dtype),
      scratch_shapes=[pltpu.VMEM((bm, bn), jnp.float32)],
      compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "arbitrary")),
      interpret=interpret_params(interpret),
      name="quantized_matmul",
  )(*parts, w, scales, zeros)
  return out[:m, :n]
