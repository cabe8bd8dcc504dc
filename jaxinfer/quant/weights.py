"""Quantized weights: the NNX modules that take a float Linear kernel's place (jaxinfer.models.layers calls
`kernel.matmul(x, dtype)`; nothing else in the model knows).

- GroupQuantizedKernel: weight-only codes with group scales and zero points (int8 per channel, RTN, GPTQ),
  multiplied by pallas_kernels.quantized_matmul (the dequantizing matmul). With act-order the codes are stored
  in the order GPTQ quantized the input rows, so groups are contiguous, and `perm` gathers x's columns to
  match (one [.., in] gather per call).
- OutlierInt8Kernel: LLM.int8(): int8 codes with one scale per output column; at run time the input feature
  dimensions where some |x| exceeds the threshold are multiplied in float, the rest as int8 x int8 -> int32
  with a scale per row of x.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from pallas_kernels.quantized_matmul import dequantize, pack_int4, quantized_matmul


def _param(value, axes):
  return nnx.Param(value, logical_axes=axes)


def nbytes(module) -> int:
  """Bytes of every array a quantized weight holds (codes, scales, zeros, permutation)."""
  return int(sum(v.get_value().nbytes for _, v in nnx.to_flat_state(nnx.state(module))))


class GroupQuantizedKernel(nnx.Module):
  """W [in, out] = (codes - zeros[g]) * scales[g], g = row // group_size, rows in `perm` order if set."""

  def __init__(self, codes: np.ndarray, scales: np.ndarray, zeros: np.ndarray, *, bits: int, group_size: int,
               method: str, axes=(None, None), perm: np.ndarray | None = None, scale_dtype: str = "float16",
               implementation: str | None = None, sym: bool = False):
    """codes [in, out] integers in [0, 2**bits) (stored rows: input rows in `perm` order when perm is given);
    scales, zeros [ceil(in / group_size), out]. A short last group is stored padded to group_size rows (codes
    at the zero point, so the padding weighs 0) and x is padded to match in matmul."""
    rows, out = codes.shape
    groups = -(-rows // group_size)
    if scales.shape != (groups, out) or zeros.shape != scales.shape:
      raise ValueError(f"scales {scales.shape} and zeros {zeros.shape} must be (ceil(in / group_size), out) = "
                       f"{(groups, out)}")
    codes = np.asarray(codes)
    if groups * group_size != rows:
      pad = np.broadcast_to(np.asarray(zeros)[-1:], (groups * group_size - rows, out))
      codes = np.concatenate([codes, pad], axis=0)
    codes = jnp.asarray(codes, jnp.uint8)
    self.codes = _param(pack_int4(codes) if bits == 4 else codes, tuple(axes))
    sdt = jnp.dtype(scale_dtype)
    self.scales = _param(jnp.asarray(scales, sdt), (None, axes[1]))
    self.zeros = _param(jnp.asarray(zeros, sdt), (None, axes[1]))
    self.perm = None if perm is None else _param(jnp.asarray(perm, jnp.int32), (axes[0],))
    self.bits, self.group_size, self.method, self.sym = bits, group_size, method, sym
    self.kernel_bits = 4 if bits == 4 else 8  # bits below 8 other than 4 live in the 8-bit container
    self.shape = (rows, out)
    self.implementation = implementation

  def matmul(self, x, dtype):
    if self.perm is not None:
      x = jnp.take(x, self.perm[...], axis=-1)
    padded = self.scales.get_value().shape[0] * self.group_size
    if padded != self.shape[0]:
      x = jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, padded - self.shape[0])])
    y = quantized_matmul(x.astype(dtype), self.codes[...], self.scales[...], self.zeros[...], bits=self.kernel_bits,
                         group_size=self.group_size, implementation=self.implementation)
    return y.astype(dtype)

  def stored_codes(self) -> jax.Array:
    """uint8 codes [in, out] in stored row order (without the padding of a short last group)."""
    from pallas_kernels.quantized_matmul.packing import unpacked_codes

    return unpacked_codes(self.codes[...], self.kernel_bits)[:self.shape[0]]

  def dequantized(self) -> jax.Array:
    """float32 [in, out] in the original input order."""
    w = dequantize(self.codes[...], self.scales[...], self.zeros[...], bits=self.kernel_bits,
                   group_size=self.group_size)[:self.shape[0]]
    if self.perm is None:
      return w
    return jnp.zeros_like(w).at[self.perm[...]].set(w)


class OutlierInt8Kernel(nnx.Module):
  """LLM.int8() weight: int8 codes [in, out] and one float scale per output column (absmax / 127)."""

  def __init__(self, kernel: np.ndarray, *, threshold: float, axes=(None, None), scale_dtype: str = "float32"):
    from jaxinfer.quant.grid import stored

    amax = np.abs(kernel).max(axis=0)
    scale = np.maximum(stored(np.where(amax > 0, amax, 1.0) / 127.0, scale_dtype), np.finfo(np.float16).tiny)
    self.codes = _param(jnp.asarray(np.clip(np.round(kernel / scale), -127, 127), jnp.int8), tuple(axes))
    self.scale = _param(jnp.asarray(scale, jnp.dtype(scale_dtype)), (axes[1],))
    self.threshold, self.method, self.bits = float(threshold), "llm_int8", 8
    self.shape = kernel.shape

  def dequantized(self) -> jax.Array:
    return self.codes[...].astype(jnp.float32) * self.scale[...].astype(jnp.float32)

  def matmul(self, x, dtype):
    xf = x.astype(jnp.float32)
    lead = xf.shape[:-1]
    xf = xf.reshape(-1, xf.shape[-1])
    outlier = jnp.max(jnp.abs(xf), axis=0) > self.threshold  # feature dimensions kept in float (this call)
    x_in = jnp.where(outlier, 0.0, xf)
    row_scale = jnp.max(jnp.abs(x_in), axis=-1, keepdims=True) / 127.0
    row_scale = jnp.where(row_scale > 0, row_scale, 1.0)
    xq = jnp.clip(jnp.round(x_in / row_scale), -127, 127).astype(jnp.int8)
    acc = jax.lax.dot_general(xq, self.codes[...], (((1,), (0,)), ((), ())), preferred_element_type=jnp.int32)
    w_scale = self.scale[...].astype(jnp.float32)
    y = acc.astype(jnp.float32) * row_scale * w_scale
    y = y + jnp.dot(jnp.where(outlier, xf, 0.0), self.dequantized(), precision=jax.lax.Precision.HIGHEST)
    return y.reshape(*lead, -1).astype(dtype)
