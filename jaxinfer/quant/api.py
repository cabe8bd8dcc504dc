"""quantize(): select the Linear layers by the rules, quantize their kernels with the method, return a copy.

Methods that need Hessians are calibrated sequentially: the layers of decoder block i are quantized from the
inputs they see once blocks < i are already quantized (as GPTQ does): one jitted pass over the calibration
batches per block.
"""

from __future__ import annotations

import numpy as np
from flax import nnx

from jaxinfer.models.layers import Linear
from jaxinfer.quant import calibration as calib
from jaxinfer.quant import rules as R
from jaxinfer.quant.config import QuantConfig
from jaxinfer.quant.methods import method as method_module


def selected_linears(model, rules) -> list[tuple[str, Linear]]:
  """(path, module) of every Linear whose path the rules select, in model order."""
  return [(R.path_name(p), m) for p, m in nnx.iter_modules(model)
          if isinstance(m, Linear) and isinstance(m.kernel, nnx.Variable) and R.selected(R.path_name(p), rules)]


def _blocks(targets):
  """Targets grouped by decoder block ("layers.<i>"), others alone, in model order."""
  groups: dict[str, list] = {}
  for path, m in targets:
    parts = path.split(".")
    key = ".".join(parts[:2]) if parts[0] == "layers" else path
    groups.setdefault(key, []).append((path, m))
  order = lambda k: (0, int(k.split(".")[1])) if k.startswith("layers.") else (1, k)  # noqa: E731
  return [groups[k] for k in sorted(groups, key=order)]


def quantize(model, method: str = "gptq", bits=None, group_size=None, calibration=None, *,
             config: QuantConfig | None = None, **options):
  """A new model with the selected Linear kernels quantized; `model` is left unchanged.

  Args:
    model: a jaxinfer Transformer (float).
    method: "int8", "llm_int8", "rtn" or "gptq" (jaxinfer.quant.methods.METHODS).
    bits, group_size: None for the method's defaults (int8: 8 per channel; rtn, gptq: 4, group 128); group_size
      -1 is one group per output channel.
    calibration: token-id batches (int [n, seq] or a list of them); required by "gptq".
    config: a QuantConfig (section `quant`); explicit arguments and `options` (any QuantConfig field: sym,
      act_order, damp, block_size, threshold, rules, scale_dtype, implementation) override it.
  """
  base = config or QuantConfig()
  changes = dict(options, method=method)
  changes.update({k: v for k, v in (("bits", bits), ("group_size", group_size)) if v is not None})
  cfg = base.replace(**changes)
  impl = method_module(cfg.method)
  cfg = impl.resolve(cfg)
  out = nnx.clone(model)
  targets = selected_linears(out, cfg.rules)
  if not targets:
    raise ValueError(f"quant.rules: no Linear layer matches {list(cfg.rules)}")
  tokens = calib.batches(calibration, model.config.vocab_size) if impl.NEEDS_HESSIAN else None
  for block in _blocks(targets):
    hessians = calib.hessians(out, [p for p, _ in block], tokens) if impl.NEEDS_HESSIAN else {}
    for path, linear in block:
      kernel = np.asarray(linear.kernel.get_value(), np.float64)
      axes = linear.kernel.get_metadata().get("logical_axes", (None, None))
      linear.kernel = impl.quantize_kernel(kernel, cfg, hessian=hessians.get(path), axes=axes, path=path)
  return out


def weight_bytes(model) -> dict[str, int]:
  """Bytes of the model's parameters: {"linear": selected+float Linear kernels, "other": the rest, "total"}."""
  linear = sum(int(sum(v.get_value().nbytes for _, v in nnx.to_flat_state(nnx.state(m.kernel))))
               if not isinstance(m.kernel, nnx.Variable) else int(m.kernel.get_value().nbytes)
               for _, m in nnx.iter_modules(model) if isinstance(m, Linear))
  total = int(sum(v.get_value().nbytes for _, v in nnx.to_flat_state(nnx.state(model))))
  return dict(linear=linear, other=total - linear, total=total)
