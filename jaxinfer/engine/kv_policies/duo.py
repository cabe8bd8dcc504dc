"""DuoAttention-style head budgets (Xiao et al., 2024): retrieval heads keep the full KV; streaming heads
see only sinks + window. Heads come as config.head_classes, or from `calibrate` below.

Identification here is NOT the paper's (an optimisation of per-head gates on synthetic passkey data): it is an
attention-mass criterion on calibration text (the stdlib's own source in the experiment): for every (layer,
kv head), the share of attention that queries past sink_tokens + window give to keys outside their sinks +
window; the `retrieval_heads` fraction of heads with the largest share are retrieval heads.

Layout: in one paged pool every head of a layer shares slots, so a streaming head's dropped tokens are
masked per head (by position, attention.py) while the retrieval heads of the same layer still hold them:
pages only go back when no head needs them, which with any retrieval head is never. The memory a separate
streaming-head cache would save is reported as accounting (kv_fraction), not realised; realising it needs a
second pool for the streaming heads (not built).
"""

from __future__ import annotations

import numpy as np

from jaxinfer.config.schema import ConfigError
from jaxinfer.engine.kv_policies.base import EvictionPolicy
from jaxinfer.engine.kv_policies.registry import register
from jaxinfer.engine.kv_policies.streaming import streaming_rule


@register("duo")
class DuoPolicy(EvictionPolicy):
  def __init__(self, config, model_config, engine_config):
    super().__init__(config, model_config, engine_config)
    classes = config.head_classes
    if len(classes) != model_config.num_layers or any(len(c) != model_config.num_kv_heads for c in classes):
      raise ConfigError(f"engine.kv_policy.head_classes: duo needs one string of {model_config.num_kv_heads} "
                        f"'r'/'s' per layer ({model_config.num_layers} layers), got {classes!r}; compute them "
                        "with jaxinfer.engine.kv_policies.duo.calibrate")
    stream = tuple(tuple(ch == "s" for ch in row) for row in classes)
    self.rule = streaming_rule(config, model_config, stream_heads=stream)

  def register_limit(self, request) -> int:
    return min(request.num_tokens, self.config.sink_tokens + self.config.window)

  def on_step(self, request, seq) -> None:
    if seq.start + seq.num_tokens - self.config.window >= self.config.sink_tokens:
      self.evicted.add(request.request_id)

  def kv_fraction(self, length: int) -> float:
    """KV a per-head cache would hold at this length, as a fraction of full KV (accounting only)."""
    stream = sum(row.count("s") for row in self.config.head_classes)
    total = self.num_layers * self.kv_heads
    kept = min(length, self.config.sink_tokens + self.config.window)
    return ((total - stream) * length + stream * kept) / (total * length)


def long_range_share(probs: np.ndarray, sinks: int, window: int) -> np.ndarray:
  """probs [heads, q, k] causal attention of one layer (query i at position i) -> [heads] share of the mass
  that queries i >= sinks + window give to keys j >= sinks with i - j >= window."""
  q, k = probs.shape[1:]
  i = np.arange(q)[:, None]
  j = np.arange(k)[None, :]
  outside = (j >= sinks) & (i - j >= window)
  rows = np.arange(q) >= sinks + window
  return (probs * outside)[:, rows].sum(axis=(1, 2)) / max(rows.sum(), 1)


def classify(shares: np.ndarray, fraction: float) -> tuple[str, ...]:
  """shares [layers, kv_heads] -> head_classes: the top `fraction` of heads by share are retrieval ('r')."""
  n = int(round(fraction * shares.size))
  order = np.argsort(-shares.reshape(-1), kind="stable")
  cls = np.full(shares.size, "s")
  cls[order[:n]] = "r"
  return tuple("".join(row) for row in cls.reshape(shares.shape))


def calibrate(model, token_ids, *, sink_tokens: int, window: int, fraction: float) -> tuple[str, ...]:
  """Head classes from one dense forward over token_ids (the attention-mass criterion above)."""
  from jaxinfer.engine.kv_policies.reference import attention_probs

  probs = attention_probs(model, np.asarray(token_ids, np.int32))  # [layers, heads, q, k]
  cfg = model.config
  group = cfg.num_heads // cfg.num_kv_heads
  shares = np.stack([long_range_share(p, sink_tokens, window) for p in probs])  # [layers, heads]
  shares = shares.reshape(cfg.num_layers, cfg.num_kv_heads, group).mean(-1)
  return classify(shares, fraction)
