"""Shape arithmetic every op shares: ceil division, rounding up to a block multiple, zero-padding one axis."""

from __future__ import annotations

import jax.numpy as jnp


def cdiv(a: int, b: int) -> int:
  return -(-a // b)


def round_up(a: int, b: int) -> int:
  return cdiv(a, b) * b


def pad_axis(x, axis: int, length: int, value=0):
  """x padded with `value` along `axis` to `length` (no copy when it already has that length)."""
  extra = length - x.shape[axis]
  if extra == 0:
    return x
  widths = [(0, 0)] * x.ndim
  widths[axis] = (0, extra)
  return jnp.pad(x, widths, constant_values=value)
