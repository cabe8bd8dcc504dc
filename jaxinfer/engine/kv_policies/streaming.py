"""StreamingLLM (Xiao et al., 2023): attention sinks plus a sliding window.

A query at position i sees keys at positions j < sink_tokens or i - j < window (itself included), in every
layer and head, during prefill (per query, exactly) and decode. Positions: "original" (RoPE at each token's
own position) or "cache" (the paper's positions within the cache; see attention.py for how).

Memory: tokens are appended in position order, so a page holds consecutive positions; a full page whose
positions are all >= sink_tokens and <= next_query - window can never be seen again and goes back to the
pool at once (no copy). A request so holds at most the sink pages, the window's pages and one step's chunk,
whatever the stream's length: table_pages bounds the page table (and the attention pass) to that.

Speculative verification (and any engine sampling up to m = max_rows_per_seq rows per sequence): a page goes
only once it left the window of the next query that is certain (after the step's own token, not after its
drafts) by m - 1 more positions, so rejected drafts (verification) and a draft twin's rolled-back tokens
(up to m - 1, speculative/draft.py) roll back without any page the kept tokens need having gone; the table
bound grows by 2 (m - 1) tokens (those kept drafts-worth plus the drafts themselves).
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
    self.margin = engine_config.max_rows_per_seq - 1  # positions kept past the window (rollbacks, above)
    self.needed_from: dict[int, int] = {}  # request id -> first next-query position its dropped pages allow

  def table_pages(self, pages_per_seq: int) -> int:
    ps, c = self.page_size, self.config
    bound = -(-c.sink_tokens // ps) + -(-(c.window + 2 * self.margin + self.max_step_tokens) // ps) + 1
    return min(pages_per_seq, bound)

  def pages_for_request(self, num_tokens: int) -> int:
    return min(-(-num_tokens // self.page_size), self.table_pages(num_tokens))

  def register_limit(self, request) -> int:
    # positions < sinks + window were computed with nothing masked: the same k/v as full attention
    return min(request.num_tokens, self.config.sink_tokens + self.config.window)

  def forget(self, request) -> None:
    super().forget(request)
    self.first_pos.pop(request.request_id, None)
    self.needed_from.pop(request.request_id, None)

  def on_step(self, request, seq) -> None:
    ps, rid = self.page_size, request.request_id
    starts = self.first_pos.setdefault(rid, [])
    held = self.held[rid]
    first_logical = held - seq.num_tokens
    for k in range(len(starts), -(-held // ps)):  # pages begun by this step (or before, on admission)
      starts.append(seq.start + k * ps - first_logical if k * ps >= first_logical else k * ps)
    next_query = self.certain_end(seq)  # drafts may still be rejected: the next query may be this one
    sinks, window = self.config.sink_tokens, self.config.window
    drop = [k for k in range((held // ps)) if starts[k] >= sinks
            and starts[k] + ps - 1 <= next_query - window - self.margin]
    if next_query - window >= sinks:
      self.evicted.add(rid)  # from now on some token is masked
    for k in reversed(drop):
      self.needed_from[rid] = max(self.needed_from.get(rid, 0), starts[k] + ps - 1 + window)
      page = request.pages.pop(k)
      starts.pop(k)
      self.allocator.decref([page])
      self.held[rid] -= ps
    self.stats["evicted_pages"] += len(drop)

  def plain_view(self, request, end: int) -> bool:
    # a query at p < sinks + window sees every earlier key (and "cache" positions rotate no sink: delta = 0)
    return (request.request_id not in self.evicted and self.layout_untouched(request)
            and end <= self.config.sink_tokens + self.config.window)

  def check_rollback(self, request, n: int, end: int) -> None:
    super().check_rollback(request, n, end)
    if end < self.needed_from.get(request.request_id, 0):
      raise ValueError(f"rollback to position {end}: kv_policy 'streaming' already dropped a page that query "
                       f"still sees (its queries need position >= {self.needed_from[request.request_id]})")

  def on_rollback(self, request, n: int, end: int) -> None:
    super().on_rollback(request, n, end)
    starts = self.first_pos.get(request.request_id)
    if starts is not None:  # pages wholly past the kept slots are gone (Scheduler.trim gives them back)
      del starts[-(-self.held[request.request_id] // self.page_size):]
