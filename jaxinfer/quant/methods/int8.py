"""int8 weight-only, one symmetric scale per output channel (W8A16): round-to-nearest on an 8-bit grid."""

from __future__ import annotations

from jaxinfer.config.schema import require
from jaxinfer.quant.methods import rtn, with_defaults

NAME = "int8"
NEEDS_HESSIAN = False


def resolve(cfg):
  cfg = with_defaults(cfg, bits=8, group_size=-1)
  require(cfg.bits == 8, "quant.bits", f"method 'int8' is 8-bit, got bits={cfg.bits} (use method 'rtn')")
  return cfg.replace(sym=True)


def quantize_kernel(kernel, cfg, *, hessian=None, axes, path):
  del hessian
  return rtn.group_weight(kernel, cfg, axes=axes, path=path, method=NAME, sym=True)
