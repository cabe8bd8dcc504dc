"""StreamingLLM (Xiao et al., 2023): attention sinks plus a sliding window.

A query at position i sees keys at positions j < sink_tokens or i - j < window (itself included), in every
layer and head, during prefill (per query, exactly) and decode. Positions: "original" (RoPE at each token's
own position) or "cache" (the paper's positions within the cache; see attention.py for how).

Memory: tokens are appended in position order, so a page holds consecutive positions; a full page whose
positions are all >= sink_tokens and <= next_query - window can never be seen again and goes back to the
pool at once (no copy). A request so holds at most the sink pages, the window's pages and one step's chunk,
whatever the stream's length: table_pages bounds the page table (and the attention pass) to that.
"""

from __future__ import annotations

from jaxinfer.engine.kv_policies.attention import MaskRule
from jaxinfer.engine.kv_policies.base import EvictionPolicy
from jaxinfer.engine.kv_policies.registry import register
from jaxinfer.models.rope import inverse_frequencies


def streaming_rule(config, model_config, stream_heads=None) -> MaskRule:
  cache = config.positions == "cache"
  inv = tuple(float(x) for x in inverse_frequencies(model_config)) if cache else ()
  return MaskRule(sinks=config.sink_tokens, window=config.window, stream_heads=stream_heads,
                  cache_positions=cache, inv_freq=inv)


@register("streaming")
class StreamingPolicy(EvictionPolicy):
  def __init__(self, config, model_config, engine_config):
    super().__init__(config, model_config, engine_config)
    self.rule = streaming_rule(config, model_config)
    self.max_step_tokens = engine_config.max_step_tokens
    self.first_pos: dict[int, list[int]] = {}  # request id -> position of the first token of each page

  def table_pages(self, pages_per_seq: int) -> int:
    ps, c = self.page_size, self.config
    bound = -(-c.sink_tokens // ps) + -(-(c.window + self.max_step_tokens) // ps) + 1
    return min(pages_per_seq, bound)

  def pages_for_request(self, num_tokens: int) -> int:
    return min(-(-num_tokens // self.page_size), self.table_pages(num_tokens))

  def register_limit(self, request) -> int:
    # positions < sinks + window were computed with nothing masked: the same k/v as full attention
    return min(request.num_tokens, self.config.sink_tokens + self.config.window)

  def forget(self, request) -> None:
    super().forget(request)
    self.first_pos.pop(request.request_id, None)

  def on_step(self, request, seq) -> None:
    ps, rid = self.page_size, request.request_id
    starts = self.first_pos.setdefault(rid, [])
    held = self.held[rid]
    first_logical = held - seq.num_tokens
    for k in range(len(starts), -(-held // ps)):  # pages begun by this step (or before, on admission)
      starts.append(seq.start + k * ps - first_logical if k * ps >= first_logical else k * ps)
    next_query = seq.start + seq.num_tokens
    sinks, window = self.config.sink_tokens, self.config.window
    drop = [k for k in range((held // ps)) if starts[k] >= sinks and starts[k] + ps - 1 <= next_query - window]
    if next_query - window >= sinks:
      self.evicted.add(rid)  # from now on some token is masked
    for k in reversed(drop):
      page = request.pages.pop(k)
      starts.pop(k)
      self.allocator.decref([page])
      self.held[rid] -= ps
    self.stats["evicted_pages"] += len(drop)

  def plain_view(self, request, end: int) -> bool:
    # a query at p < sinks + window sees every earlier key (and "cache" positions rotate no sink: delta = 0)
    return (request.request_id not in self.evicted and self.layout_untouched(request)
            and end <= self.config.sink_tokens + self.config.window)
