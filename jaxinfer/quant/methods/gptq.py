"""GPTQ (Frantar et al., 2023): quantize a layer's input columns one at a time, each time moving the rounding
error onto the columns not yet quantized, weighted by the inverse Hessian of the layer's inputs
(H = 2 X X^T / n from calibration batches), so that ||W X - Q X|| stays small.

As in the paper: the inverse Hessian's upper Cholesky factor U (H^-1 = U^T U) gives each step's update row
(the Cholesky reformulation, numerically stable with damping); updates are applied lazily, `block_size`
columns at a time (the rest of the matrix gets one matmul per block); the group's scale and zero point are
fitted when its first column comes up (so they see the updates so far); act-order quantizes columns by
decreasing Hessian diagonal, and the groups then follow that order (the kernel stores rows in that order).
"""

from __future__ import annotations

import numpy as np

from jaxinfer.quant import grid
from jaxinfer.quant.methods import with_defaults
from jaxinfer.quant.weights import GroupQuantizedKernel

NAME = "gptq"
NEEDS_HESSIAN = True


def resolve(cfg):
  return with_defaults(cfg, bits=4, group_size=128)


def inverse_hessian_factor(hessian: np.ndarray, damp: float) -> np.ndarray:
  """U upper triangular with (H + damp * mean(diag H) I)^-1 = U^T U."""
  h = hessian + damp * np.mean(np.diag(hessian)) * np.eye(hessian.shape[0])
  lower = np.linalg.cholesky(h)
  eye = np.eye(h.shape[0])
  inv_lower = np.linalg.solve(lower, eye)  # L^-1, so H^-1 = L^-T L^-1
  return np.linalg.cholesky(inv_lower.T @ inv_lower).T


def gptq(weight: np.ndarray, hessian: np.ndarray, *, bits: int, group_size: int, sym: bool, act_order: bool,
         damp: float, block_size: int, scale_dtype: str = "float32"):
  """weight [out, in] (float64), hessian [in, in] -> (codes [in, out] in quantization order, scales [groups,
  out], zeros [groups, out], perm [in] or None): column perm[j] of the weight was quantized j-th."""
  w = np.array(weight, np.float64)
  h = np.array(hessian, np.float64)
  n = w.shape[1]
  dead = np.diag(h) == 0  # inputs that never fire: nothing to preserve there
  h[dead, dead] = 1.0
  w[:, dead] = 0.0
  perm = np.argsort(-np.diag(h), kind="stable") if act_order else None
  if perm is not None:
    w, h = w[:, perm], h[perm][:, perm]
  u = inverse_hessian_factor(h, damp)
  codes = np.zeros_like(w)
  scales, zeros = [], []
  for b0 in range(0, n, block_size):
    b1 = min(b0 + block_size, n)
    block = w[:, b0:b1].copy()
    errors = np.zeros_like(block)
    for t in range(b1 - b0):
      i = b0 + t
      if i % group_size == 0:  # the group's grid, on its columns as updated so far
        cols = np.concatenate([block[:, t:t + group_size], w[:, b1:i + group_size]], axis=1)
        scale, zero = grid.fit(cols.T, bits, sym, scale_dtype)
        scales.append(scale)
        zeros.append(zero)
      col = block[:, t]
      q = grid.codes(col, scale, zero, bits)
      codes[:, i] = q
      err = (col - grid.dequantize(q, scale, zero)) / u[i, i]
      block[:, t:] -= np.outer(err, u[i, i:b1])
      errors[:, t] = err
    w[:, b1:] -= errors @ u[b0:b1, b1:]
  return codes.T, np.stack(scales), np.stack(zeros), perm


def canonical_order(codes: np.ndarray, perm: np.ndarray | None, group_size: int):
  """Rows of each group sorted by input index (the order a checkpoint's g_idx gives back on loading, so a saved
  act-order model reloads with the same summation order): (codes, perm); None stays None."""
  if perm is None:
    return codes, None
  order = np.concatenate([np.argsort(perm[g:g + group_size], kind="stable") + g
                          for g in range(0, perm.size, group_size)])
  return codes[order], perm[order]


def quantize_kernel(kernel, cfg, *, hessian, axes, path):
  if hessian is None:
    raise ValueError(f"{path}: method 'gptq' needs the layer's input Hessian (pass calibration batches)")
  gs = grid.resolve_group(cfg.group_size, kernel.shape[0], path)
  codes, scales, zeros, perm = gptq(kernel.T, hessian, bits=cfg.bits, group_size=gs, sym=cfg.sym,
                                    act_order=cfg.act_order, damp=cfg.damp, block_size=cfg.block_size,
                                    scale_dtype=cfg.scale_dtype)
  codes, perm = canonical_order(codes, perm, gs)
  return GroupQuantizedKernel(codes, scales, zeros, bits=cfg.bits, group_size=gs, method=NAME, axes=axes, perm=perm,
                              scale_dtype=cfg.scale_dtype, implementation=cfg.implementation, sym=cfg.sym)
