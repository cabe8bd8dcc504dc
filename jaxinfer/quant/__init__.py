"""Weight quantization: `quantize(model, method=..., bits=..., group_size=..., calibration=...)` returns a new
model whose selected Linear kernels are quantized weights (the float model is left unchanged).

  qmodel = jaxinfer.quantize(model, method="gptq", bits=4, group_size=128, calibration=token_batches)

Methods (one file each in jaxinfer/quant/methods/, one interface): "int8" (per-channel W8A16), "llm_int8"
(LLM.int8(): int8 inliers, float outlier feature dimensions), "rtn" (group-wise round-to-nearest), "gptq"
(Hessian-aware, from calibration batches). Which layers: QuantConfig.rules (module-path patterns). The
quantized weights (weights.py) plug into the model's one quantized-linear path (jaxinfer.models.layers).
"""

from jaxinfer.quant.config import DEFAULT_RULES, QuantConfig


def quantize(model, method: str = "gptq", bits=None, group_size=None, calibration=None, **options):
  """See jaxinfer.quant.api.quantize."""
  from jaxinfer.quant.api import quantize as _quantize

  return _quantize(model, method=method, bits=bits, group_size=group_size, calibration=calibration, **options)


__all__ = ["DEFAULT_RULES", "QuantConfig", "quantize"]
