"""DuoAttention head budgets in the ONE paged pool (policy "duo_masked"): the ablation of the realised layout.

Every head of a layer shares slots, so a streaming head's dropped tokens are only masked per head (by position,
attention.py) while the retrieval heads of the same layer still hold them: pages only go back when no head
needs them, which with any retrieval head is never. No memory is saved (kv_fraction is accounting); the
realised layout is policy "duo" (duo.py, duo_store.py). This one remains the layout for what "duo" refuses:
a sharded model whose retrieval heads do not fall evenly on the shards (its per-shard masked pass splits
every head of the pool alike).
"""

from __future__ import annotations

from jaxinfer.engine.kv_policies.base import EvictionPolicy
from jaxinfer.engine.kv_policies.duo import parse_classes
from jaxinfer.engine.kv_policies.registry import register
from jaxinfer.engine.kv_policies.streaming import streaming_rule


@register("duo_masked")
class DuoMaskedPolicy(EvictionPolicy):
  def __init__(self, config, model_config, engine_config):
    super().__init__(config, model_config, engine_config)
    stream = tuple(tuple(ch == "s" for ch in row) for row in parse_classes(config, model_config))
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
