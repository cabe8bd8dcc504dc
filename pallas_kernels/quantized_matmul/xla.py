"""quantized_matmul in XLA, group by group: y = sum_g s_g * (x_g @ c_g - rowsum(x_g) z_g).

The codes enter the matmul as small integers (exact in the activation dtype up to 8 bits for bf16 too); the
scales and zero points are applied to the [M, groups, N] partial sums, so no scaled float copy of the weight
is formed. bits=4 multiplies the even and odd input columns by the low and high nibbles.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels.op import always_available

unavailable_reason = always_available


def _partials(x, codes, group_rows):
  """x [M, Kc], codes [Kc, N] -> (x_g @ c_g [M, G, N], rowsum(x_g) [M, G]) in float32."""
  m, kc = x.shape
  g = kc // group_rows
  xg = x.reshape(m, g, group_rows)
  # XLA:CPU has no bf16 x bf16 -> f32 dot; there the products are formed in float32 (same values)
  dtype = jnp.float32 if jax.default_backend() == "cpu" else x.dtype
  cg = codes.reshape(g, group_rows, codes.shape[1]).astype(dtype)
  prec = jax.lax.Precision.HIGHEST if dtype == jnp.float32 else None
  dots = jnp.einsum("mgk,gkn->mgn", xg.astype(dtype), cg, precision=prec, preferred_element_type=jnp.float32)
  return dots, jnp.sum(xg.astype(jnp.float32), axis=-1)


def quantized_matmul(x, w, scales, zeros, *, bits, group_size, interpret=False):
  del interpret
  s = scales.astype(jnp.float32)[None]
  z = zeros.astype(jnp.float32)[None]
  if bits == 4:
    half = group_size // 2
    d_lo, r_lo = _partials(x[:, 0::2], w & 0xF, half)
    d_hi, r_hi = _partials(x[:, 1::2], w >> 4, half)
    dots, rows = d_lo + d_hi, r_lo + r_hi
  else:
    dots, rows = _partials(x, w, group_size)
  y = jnp.sum(s * (dots - rows[..., None] * z), axis=1)
  return y.astype(x.dtype)
