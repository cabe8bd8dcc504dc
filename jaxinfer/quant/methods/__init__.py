"""The quantization methods: name -> module, every module with the same interface (a new method is a new file
and one line here):

  NAME: str; NEEDS_HESSIAN: bool (calibration batches required: the input Hessian of each layer)
  resolve(cfg: QuantConfig) -> QuantConfig     the method's defaults filled in, its limits checked (ConfigError
                                               naming quant.<field>)
  quantize_kernel(kernel [in, out] float64 numpy, cfg, *, hessian [in, in] or None, axes, path) -> weight module
"""

from __future__ import annotations

import importlib

METHODS = {
    "int8": "jaxinfer.quant.methods.int8",
    "llm_int8": "jaxinfer.quant.methods.llm_int8",
    "rtn": "jaxinfer.quant.methods.rtn",
    "gptq": "jaxinfer.quant.methods.gptq",
}


def method(name: str):
  from jaxinfer.config.schema import ConfigError

  if name not in METHODS:
    raise ConfigError(f"quant.method: unknown method {name!r}; choose one of {sorted(METHODS)}")
  return importlib.import_module(METHODS[name])


def with_defaults(cfg, **defaults):
  """cfg with its None fields among `defaults` filled in."""
  return cfg.replace(**{k: v for k, v in defaults.items() if getattr(cfg, k) is None})
