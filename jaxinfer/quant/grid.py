"""The uniform quantization grid shared by every weight-only method (numpy, float64): fit a scale and an integer
zero point per output column over a set of input rows, round to codes, and back.

Min-max (asymmetric): the range [min(w, 0), max(w, 0)] is cut into 2**bits - 1 steps; symmetric: the range
is [-max|w|, max|w|] with the zero point at 2**(bits - 1). Scales are rounded to the stored dtype before any
code is chosen, so the codes are the best ones for the scales that are kept.
"""

from __future__ import annotations

import numpy as np


def stored(values, dtype: str) -> np.ndarray:
  """values rounded to the stored dtype (float16, bfloat16, float32), back in float64."""
  import jax.numpy as jnp

  return np.asarray(np.asarray(values).astype(jnp.dtype(dtype)), np.float64)


def fit(w: np.ndarray, bits: int, sym: bool, scale_dtype: str = "float32") -> tuple[np.ndarray, np.ndarray]:
  """w [rows, out] -> (scale [out], zero [out]) for codes in [0, 2**bits)."""
  maxq = 2 ** bits - 1
  lo = np.minimum(w.min(axis=0), 0.0)
  hi = np.maximum(w.max(axis=0), 0.0)
  if sym:
    hi = np.maximum(-lo, hi)
    lo = -hi
  flat = hi == lo
  lo, hi = np.where(flat, -1.0, lo), np.where(flat, 1.0, hi)
  scale = np.maximum(stored((hi - lo) / maxq, scale_dtype), np.finfo(np.float16).tiny)
  zero = np.full_like(scale, (maxq + 1) // 2) if sym else np.clip(np.round(-lo / scale), 0, maxq)
  return scale, zero


def codes(w: np.ndarray, scale, zero, bits: int) -> np.ndarray:
  """Round-to-nearest codes of w (any leading rows) on the grid."""
  return np.clip(np.round(w / scale) + zero, 0, 2 ** bits - 1)


def dequantize(q: np.ndarray, scale, zero) -> np.ndarray:
  return (q - zero) * scale


def resolve_group(group_size: int, rows: int, what: str) -> int:
  """The group size for a kernel with `rows` input rows (-1: all of them). When it does not divide `rows` the
  last group is shorter (as GPTQ's g_idx = row // group_size makes it)."""
  gs = rows if group_size == -1 else group_size
  if gs > rows:
    raise ValueError(f"{what}: group_size={gs} exceeds the {rows} input rows")
  return gs


def num_groups(rows: int, group_size: int) -> int:
  return -(-rows // group_size)


def round_to_nearest(kernel: np.ndarray, bits: int, group_size: int, sym: bool, scale_dtype: str):
  """kernel [in, out] -> (codes [in, out], scales [groups, out], zeros [groups, out]) group by group (a short
  last group is padded with zero weights, which the range [min(w, 0), max(w, 0)] already holds)."""
  rows, out = kernel.shape
  g = num_groups(rows, group_size)
  padded = np.zeros((g * group_size, out))
  padded[:rows] = kernel
  groups = padded.reshape(g, group_size, out)
  fitted = [fit(x, bits, sym, scale_dtype) for x in groups]
  scales = np.stack([s for s, _ in fitted])
  zeros = np.stack([z for _, z in fitted])
  q = codes(groups, scales[:, None], zeros[:, None], bits).reshape(g * group_size, out)[:rows]
  return q, scales, zeros
