"""The weight layout every implementation reads (plain jnp; no op folder imports).

A weight [K, N] (K inputs, N outputs, x @ W) is stored as unsigned codes with one scale and one zero point per
group of `group_size` consecutive input rows and per output column:

  W[k, n] = (code[k, n] - zeros[k // group_size, n]) * scales[k // group_size, n]

bits=8: codes uint8 [K, N], one per byte. bits=4: codes uint8 [K / 2, N], two per byte along K: byte r holds
row 2r in its low nibble and row 2r + 1 in its high nibble (so a kernel unpacks a tile with a mask and a shift
and multiplies the even and odd input columns separately: no interleave in registers). Codes below 2**bits
of any width up to 8 (a 3-bit grid, say) use the bits=8 container. scales and zeros: float [K / group_size, N]
(zeros hold integers; float16 keeps them exact).
"""

from __future__ import annotations

import jax.numpy as jnp

SUPPORTED_BITS = (4, 8)


def codes_per_byte(bits: int) -> int:
  return 2 if bits == 4 else 1


def pack_int4(codes):
  """uint8 codes [K, N] in [0, 16) with K even -> uint8 [K / 2, N] (row 2r low nibble, 2r + 1 high)."""
  codes = jnp.asarray(codes, jnp.uint8)
  if codes.shape[0] % 2:
    raise ValueError(f"pack_int4: K={codes.shape[0]} rows must be even to pack two 4-bit codes per byte")
  return codes[0::2] | (codes[1::2] << 4)


def unpack_int4(packed):
  """uint8 [K / 2, N] -> uint8 codes [K, N] (the inverse of pack_int4)."""
  packed = jnp.asarray(packed, jnp.uint8)
  lo, hi = packed & 0xF, packed >> 4
  return jnp.stack([lo, hi], axis=1).reshape(2 * packed.shape[0], packed.shape[1])


def unpacked_codes(w, bits: int):
  """The codes [K, N] of a stored weight (unpacks bits=4)."""
  return unpack_int4(w) if bits == 4 else jnp.asarray(w, jnp.uint8)


def dequantize(w, scales, zeros, *, bits: int, group_size: int, dtype=jnp.float32):
  """The float weight [K, N] a stored weight stands for (what reference.py multiplies by)."""
  codes = unpacked_codes(w, bits).astype(jnp.float32)
  s = jnp.repeat(jnp.asarray(scales, jnp.float32), group_size, axis=0)
  z = jnp.repeat(jnp.asarray(zeros, jnp.float32), group_size, axis=0)
  return ((codes - z) * s).astype(dtype)
