"""Round-to-nearest, group-wise (int4 by default, any width 2..8): the baseline GPTQ is measured against."""

from __future__ import annotations

from jaxinfer.quant import grid
from jaxinfer.quant.methods import with_defaults
from jaxinfer.quant.weights import GroupQuantizedKernel

NAME = "rtn"
NEEDS_HESSIAN = False


def resolve(cfg):
  return with_defaults(cfg, bits=4, group_size=128)


def group_weight(kernel, cfg, *, axes, path, method=NAME, sym=None):
  sym = cfg.sym if sym is None else sym
  gs = grid.resolve_group(cfg.group_size, kernel.shape[0], path)
  codes, scales, zeros = grid.round_to_nearest(kernel, cfg.bits, gs, sym, cfg.scale_dtype)
  return GroupQuantizedKernel(codes, scales, zeros, bits=cfg.bits, group_size=gs, method=method, axes=axes,
                              scale_dtype=cfg.scale_dtype, implementation=cfg.implementation, sym=sym)


def quantize_kernel(kernel, cfg, *, hessian=None, axes, path):
  del hessian
  return group_weight(kernel, cfg, axes=axes, path=path)
