"""QuantConfig: the `quant` section (a frozen dataclass, validated; to and from ml-collections with
jaxinfer.config.to_section / from_section)."""

from __future__ import annotations

import dataclasses
import re

from jaxinfer.config.schema import require
from jaxinfer.quant import rules as R

# first match wins; "!pattern" keeps a layer in float. Embedding and lm_head stay float by default.
DEFAULT_RULES = ("!lm_head", "!embed_tokens", r"layers\.\d+\..*")
SCALE_DTYPES = ("float16", "bfloat16", "float32")


@dataclasses.dataclass(frozen=True)
class QuantConfig:
  SECTION = "quant"
  method: str = "gptq"  # a name in jaxinfer.quant.methods.METHODS
  bits: int | None = None  # None: the method's default (int8, llm_int8: 8; rtn, gptq: 4)
  group_size: int | None = None  # input rows per scale; -1: one group per output channel; None: method default
  sym: bool = False  # symmetric grid (zero point at the middle) instead of min-max
  act_order: bool = False  # gptq: quantize columns in order of decreasing Hessian diagonal
  damp: float = 0.01  # gptq: damping, a fraction of the mean Hessian diagonal added to it
  block_size: int = 128  # gptq: columns per lazy batch update
  threshold: float = 6.0  # llm_int8: |x| above which a feature dimension is an outlier (kept in float)
  rules: tuple[str, ...] = DEFAULT_RULES  # module-path patterns (see rules.py)
  scale_dtype: str = "float16"  # dtype of the stored scales and zero points
  implementation: str | None = None  # pallas_kernels.quantized_matmul implementation (None: backend default)

  def __post_init__(self):
    from jaxinfer.quant.methods import METHODS

    f = lambda name: f"{self.SECTION}.{name}"  # noqa: E731
    require(self.method in METHODS, f("method"), f"unknown method {self.method!r}; choose one of {sorted(METHODS)}")
    require(self.bits is None or (isinstance(self.bits, int) and 2 <= self.bits <= 8), f("bits"),
            f"must be an integer in [2, 8] or None, got {self.bits!r}")
    require(self.group_size is None or self.group_size == -1 or (isinstance(self.group_size, int)
                                                                 and self.group_size >= 2), f("group_size"),
            f"must be -1 (per channel), an integer >= 2, or None, got {self.group_size!r}")
    require(self.damp > 0, f("damp"), f"must be > 0, got {self.damp}")
    require(isinstance(self.block_size, int) and self.block_size >= 1, f("block_size"),
            f"must be a positive integer, got {self.block_size!r}")
    require(self.threshold > 0, f("threshold"), f"must be > 0, got {self.threshold}")
    require(self.scale_dtype in SCALE_DTYPES, f("scale_dtype"), f"{self.scale_dtype!r} is not one of {SCALE_DTYPES}")
    require(bool(self.rules), f("rules"), "needs at least one pattern")
    for rule in self.rules:
      try:
        R.compile_rule(rule)
      except re.error as e:
        raise R.rule_error(rule, e) from None

  def replace(self, **changes) -> "QuantConfig":
    return dataclasses.replace(self, **changes)
