"""quantized_matmul, obviously correct: dequantize the whole weight in float32, then one float32 matmul."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels.op import always_available
from pallas_kernels.quantized_matmul.packing import dequantize

unavailable_reason = always_available


def quantized_matmul(x, w, scales, zeros, *, bits, group_size, interpret=False):
  del interpret
  weight = dequantize(w, scales, zeros, bits=bits, group_size=group_size)
  y = jnp.dot(x.astype(jnp.float32), weight, precision=jax.lax.Precision.HIGHEST)
  return y.astype(x.dtype)
