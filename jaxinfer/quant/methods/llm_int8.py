"""LLM.int8(): vector-wise int8 weights and activations, with the outlier feature dimensions (|x| > threshold,
6.0 by default) multiplied in float (weights.OutlierInt8Kernel)."""

from __future__ import annotations

from jaxinfer.config.schema import require
from jaxinfer.quant.methods import with_defaults
from jaxinfer.quant.weights import OutlierInt8Kernel

NAME = "llm_int8"
NEEDS_HESSIAN = False


def resolve(cfg):
  cfg = with_defaults(cfg, bits=8, group_size=-1)
  require(cfg.bits == 8, "quant.bits", f"method 'llm_int8' is 8-bit, got bits={cfg.bits}")
  require(cfg.group_size == -1, "quant.group_size", f"method 'llm_int8' scales per output channel (-1), got "
          f"{cfg.group_size}")
  return cfg


def quantize_kernel(kernel, cfg, *, hessian=None, axes, path):
  del hessian, path
  return OutlierInt8Kernel(kernel, threshold=cfg.threshold, axes=axes, scale_dtype="float32")
