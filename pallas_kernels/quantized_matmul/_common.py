"""Operand preparation shared by the Pallas kernels: split x into the column sets the codes multiply (even /
odd columns for bits=4), and pad to whole tiles. Padding copies only for shapes that are not tile multiples
(odd M is the x rows, cheap; odd N or groups that are not a tile multiple copy the weight)."""

from __future__ import annotations

import jax.numpy as jnp

from pallas_kernels.shapes import pad_axis, round_up  # noqa: F401  (used by the kernels)


def x_parts(x, bits: int):
  """The activations each code plane multiplies: [x] for bits=8; [x even columns, x odd columns] for bits=4
  (packing.py: byte r holds rows 2r and 2r + 1)."""
  return [x[:, 0::2], x[:, 1::2]] if bits == 4 else [x]


def group_rows(bits: int, group_size: int) -> int:
  """Stored code rows per group."""
  return group_size // 2 if bits == 4 else group_size


def pad_groups(parts, w, rows: int, new_rows: int):
  """Pads every group from `rows` to `new_rows` stored rows (zero activations and zero codes there, so the
  padding adds nothing)."""
  if new_rows == rows:
    return parts, w
  groups = w.shape[0] // rows

  def pad(a, axis):
    shape = a.shape[:axis] + (groups, rows) + a.shape[axis + 1:]
    a = pad_axis(a.reshape(shape), axis + 1, new_rows)
    return a.reshape(a.shape[:axis] + (groups * new_rows,) + a.shape[axis + 2:])

  return [pad(p, 1) for p in parts], pad(w, 0)


def pad_tiles(parts, w, scales, zeros, *, m: int, n: int):
  """Pads x rows to m and the output columns (codes, scales, zeros) to n."""
  parts = [pad_axis(p, 0, m) for p in parts]
  return parts, pad_axis(w, 1, n), pad_axis(scales, 1, n), pad_axis(zeros, 1, n)
