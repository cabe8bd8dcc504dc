"""quantized_matmul for NVIDIA GPUs ("pallas_gpu", Pallas Triton): grid (row tiles, column tiles); each program
streams its column tile's codes block_k rows at a time, unpacks them in registers (mask / shift for bits=4),
dequantizes with its group's scale and zero point (a block never straddles a group) and accumulates
x_tile @ w_tile in float32. The weight is read once, as codes; no dequantized copy exists outside registers.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.op import requires_backend
from pallas_kernels.quantized_matmul import _common as C

NAME = "pallas_gpu"
_MIN_DIM = 16  # Triton's smallest dot tile

unavailable_reason = requires_backend("gpu", NAME)


def _kernel(*refs, n_parts, block_k, rows_per_group, steps, bits, compute_dtype):
  x_refs, (w_ref, s_ref, z_ref, o_ref) = refs[:n_parts], refs[n_parts:]

  def body(i, acc):
    r0 = pl.multiple_of(i * block_k, block_k)
    g = r0 // rows_per_group
    s = s_ref[pl.ds(g, 1), :].astype(jnp.float32)
    z = z_ref[pl.ds(g, 1), :].astype(jnp.float32)
    w = w_ref[pl.ds(r0, block_k), :]
    planes = (w & 0xF, w >> 4) if bits == 4 else (w,)
    for x_ref, codes in zip(x_refs, planes):
      deq = ((codes.astype(jnp.float32) - z) * s).astype(compute_dtype)
      xt = x_ref[:, pl.ds(r0, block_k)].astype(compute_dtype)
      acc += jnp.dot(xt, deq, preferred_element_type=jnp.float32)
    return acc

  acc = lax.fori_loop(0, steps, body, jnp.zeros(o_ref.shape, jnp.float32))
  o_ref[...] = acc.astype(o_ref.dtype)


def _block_k(rows: int, cap: int) -> int | None:
  return next((b for b in (64, 32, 16) if b <= cap and rows % b == 0), None)


def quantized_matmul(x, w, scales, zeros, *, bits, group_size, interpret=False, block_m: int | None = None,
                     block_n: int = 64, block_k: int = 64, num_warps: int = 4, num_stages: int = 2):
  """Same contract as `pallas_kernels.quantized_matmul`. block_m: rows per tile (None: M rounded up to a power
  of two, 16..64); block_n: output columns per tile; block_k: stored code rows per step (a power of two >= 16
  dividing the group's rows; groups whose rows are not a multiple of 16 are padded, a copy)."""
  for name, value in (("block_n", block_n), ("block_k", block_k)) + ((("block_m", block_m),) if block_m else ()):
    if value < _MIN_DIM or value & (value - 1):
      raise ValueError(f"{name} must be a power of two >= {_MIN_DIM} for {NAME}, got {value}")
  m, n = x.shape[0], w.shape[1]
  parts = C.x_parts(x, bits)
  rows = C.group_rows(bits, group_size)
  bk = _block_k(rows, block_k)
  if bk is None:
    padded = C.round_up(rows, _MIN_DIM)
    parts, w = C.pad_groups(parts, w, rows, padded)
    rows, bk = padded, _block_k(padded, block_k) or _MIN_DIM
  bm = block_m or min(64, max(_MIN_DIM, pl.next_power_of_2(m)))
  bn = min(block_n, max(_MIN_DIM, pl.next_power_of_2(n)))
  mp, np_ = C.round_up(m, bm), C.round_up(n, bn)
  parts, w, scales, zeros = C.pad_tiles(parts, w, scales, zeros, m=mp, n=np_)
  kc, groups = w.shape[0], scales.shape[0]
  kernel = functools.partial(_kernel, n_parts=len(parts), block_k=bk, rows_per_group=rows, steps=kc // bk,
                             bits=bits, compute_dtype=x.dtype)
  out = pl.pallas_call(
      kernel,
      grid=(mp // bm, np_ // bn),
      in_specs=[pl.BlockSpec((bm, kc), lambda i, j: (i, 0)) for _ in parts] + [
          pl.BlockSpec((kc, bn), lambda i, j: (0, j)),
          pl.BlockSpec((groups, bn), lambda i, j: (0, j)),
          pl.BlockSpec((groups, bn), lambda i, j: (0, j)),
      ],
      out_specs=pl.BlockSpec((bm, bn), lambda i, j: (i, j)),
      out_shape=jax.ShapeDtypeStruct((mp, np_), x.dtype),
      compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages),
      interpret=bool(interpret),
      name="quantized_matmul",
  )(*parts, w, scales, zeros)
  return out[:m, :n]
