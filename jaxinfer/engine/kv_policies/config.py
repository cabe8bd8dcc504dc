"""KVPolicyConfig: the config section `engine.kv_policy` (EngineConfig.kv_policy), one frozen validated dataclass.

  engine = jaxinfer.Engine(model, kv_policy=KVPolicyConfig(name="streaming", sink_tokens=4, window=256))
  --config.engine.kv_policy.name=snapkv --config.engine.kv_policy.budget=128

Fields (which ones a policy reads is said in its file under jaxinfer/engine/kv_policies/):
  name         "none" | "streaming" | "snapkv" | "h2o" | "duo" (any name in the registry; "h2o_unscored":
               H2O without its scoring, an ablation for timing, h2o_unscored.py; "duo_masked": Duo's heads
               masked in one pool, duo_masked.py)
  sink_tokens  streaming / duo: the first tokens every query keeps seeing (attention sinks)
  window       streaming / duo: most recent tokens seen, the query itself included; snapkv: the observation
               window W (the last W prompt queries that score the prompt); h2o: the recent tokens always kept
  budget       snapkv / h2o: KV slots each (layer, kv head) keeps (heavy hitters + window)
  positions    "original": RoPE at each token's position in the text; "cache": the StreamingLLM paper's
               positions within the cache (the sinks sit just before the window)
  pool_kernel  snapkv: width of the 1-D max pooling over prompt positions (odd)
  retrieval_heads  duo: fraction of (layer, kv head) pairs kept whole (the rest stream sinks + window)
  head_classes duo: optional explicit classification, one string per layer of 'r' (retrieval) / 's'
               (streaming) per kv head, e.g. ("rs", "sr"); empty: the calibration pass decides
Every error is a ConfigError whose message starts with `engine.kv_policy.<field>: `.
"""

from __future__ import annotations

import dataclasses

from jaxinfer.config.schema import ConfigError

POSITIONS = ("cache", "original")


def _err(field: str, message: str) -> ConfigError:
  return ConfigError(f"engine.kv_policy.{field}: {message}")


@dataclasses.dataclass(frozen=True)
class KVPolicyConfig:
  SECTION = "kv_policy"

  name: str = "none"
  sink_tokens: int = 4
  window: int = 64
  budget: int = 256
  positions: str = "original"
  pool_kernel: int = 5
  retrieval_heads: float = 0.5
  head_classes: tuple = ()

  def __post_init__(self):
    from jaxinfer.engine.kv_policies.registry import names

    if self.name not in names():
      raise _err("name", f"name={self.name!r} is not one of {names()}")
    for field, low in (("sink_tokens", 0), ("window", 1), ("budget", 1), ("pool_kernel", 1)):
      value = getattr(self, field)
      if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise _err(field, f"{field} must be an integer >= {low}, got {value!r}")
    if self.pool_kernel % 2 == 0:
      raise _err("pool_kernel", f"pool_kernel must be odd (centred pooling), got {self.pool_kernel}")
    if self.positions not in POSITIONS:
      raise _err("positions", f"positions={self.positions!r} is not one of {POSITIONS}")
    if not isinstance(self.retrieval_heads, (int, float)) or not 0.0 <= self.retrieval_heads <= 1.0:
      raise _err("retrieval_heads", f"retrieval_heads must be a fraction in [0, 1], got {self.retrieval_heads!r}")
    for row in self.head_classes:
      if not isinstance(row, str) or not row or set(row) - {"r", "s"}:
        raise _err("head_classes", f"each entry must be a non-empty string of 'r'/'s', got {row!r}")
    if self.name in ("snapkv", "h2o", "h2o_unscored", "h2o_wide") and self.window >= self.budget:
      raise _err("window", f"{self.name}: window={self.window} must be < budget={self.budget} (the rest of the "
                 "budget holds the heavy hitters)")
