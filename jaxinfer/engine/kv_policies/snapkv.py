"""SnapKV (Li et al., 2024): at the end of prefill, keep per (layer, kv head) the prompt positions the last
`window` prompt queries (the observation window) attend to most, max-pooled over `pool_kernel` neighbours,
top budget - window of them, plus the observation window itself; compact them into fewer pages.

Prefill runs with full attention; its observation rows add their attention mass (summed over the query heads
of each kv group and over the window's queries) to the request's score row inside the step. Right after the
step that ends the prompt, one device program selects and moves the kept slots into ceil(budget /
page_size) fresh pages and the prompt's pages go back. Decode then runs the ordinary paged kernel over the
compacted slots (nothing is masked any more, nothing scored), so a decode step reads budget + generated keys.

Speculative verification: drafts only ever follow the prompt's end (decodes), after the compaction, so a
verification step only appends; its rejected drafts are the newest slots of every head and roll back as
they are. A rollback may reach back into the compacted slots only as far as the observation window (kept
whole, in position order, by every head); EngineConfig asks window > k for that (a draft twin's rollbacks).
"""

from __future__ import annotations

import functools

import numpy as np

from jaxinfer.engine.kv_policies import device
from jaxinfer.engine.kv_policies.attention import MaskRule
from jaxinfer.engine.kv_policies.base import EvictionPolicy
from jaxinfer.engine.kv_policies.registry import register


@register("snapkv")
class SnapKVPolicy(EvictionPolicy):
  rule = MaskRule(scores=True, kernel_decode=True)

  def __init__(self, config, model_config, engine_config):
    super().__init__(config, model_config, engine_config)
    self.select = functools.partial(device.snapkv_select, window=config.window, kernel=config.pool_kernel,
                                    keep=config.budget)
    self.tail_from: dict[int, int] = {}  # request id -> first position every head holds, in order (compacted)

  def forget(self, request) -> None:
    super().forget(request)
    self.tail_from.pop(request.request_id, None)

  def check_rollback(self, request, n: int, end: int) -> None:
    super().check_rollback(request, n, end)
    if end < self.tail_from.get(request.request_id, 0):
      raise ValueError(f"rollback to position {end}: kv_policy 'snapkv' compacted the prompt; only positions >= "
                       f"{self.tail_from[request.request_id]} (its observation window on) are held by every head")

  def register_limit(self, request) -> int:
    # a prefix-cache hit skips its cached rows: never let it skip observation rows (they score the prompt)
    end = self.prefill_end.get(request.request_id, request.num_tokens)
    return min(super().register_limit(request), end - self.config.window)

  def row_weights(self, request, positions: np.ndarray) -> np.ndarray:
    end = self.prefill_end[request.request_id]
    return ((positions >= end - self.config.window) & (positions < end)).astype(np.float32)

  def on_step(self, request, seq) -> None:
    rid = request.request_id
    if seq.start + seq.num_tokens == self.prefill_end[rid] and rid not in self.evicted:
      if self.held[rid] > self.config.budget:
        if self.compact_into_fresh_pages(request, self.config.budget, self.select):
          self.tail_from[rid] = self.prefill_end[rid] - self.config.window
      else:
        self.evicted.add(rid)  # nothing to drop; decode appends as usual (and its pages are not named)

  def plain_view(self, request, end: int) -> bool:
    # decode rows past the prompt carry no score weight; before any compaction the layout is the plain one
    # (a prompt within the budget is never compacted; a longer one is, at the end of its prefill, for good)
    prompt_end = self.prefill_end.get(request.request_id)
    return prompt_end is not None and end > prompt_end and self.layout_untouched(request)
