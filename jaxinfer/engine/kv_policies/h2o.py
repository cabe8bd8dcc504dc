"""H2O (Zhang et al., 2023): heavy hitters by accumulated attention mass plus the recent tokens, within a
budget of `budget` slots per (layer, kv head), `window` of them the most recent.

Every query row (prefill and decode) adds the attention it gives each slot to the request's score row,
computed by the policy's attention pass inside the step (a jnp pass over the kept slots beside the output;
the paged kernels are untouched). At the end of prefill a longer prompt is cut to the budget (top mass +
recent, compacted into fresh pages, as SnapKV but with every prompt query's mass); then each decode step
that takes the request over the budget evicts, per (layer, kv head), the live slot older than the window
with the least accumulated mass (its position becomes -1 for that head: masked from then on). Holes are
compacted away every page_size evictions, so a request holds at most ceil(budget / page_size) + 2 pages:
decode_table_pages gives that bound, so steps whose requests are all within it read only that many pages
(the prompt's prefill, and a request whose compaction was deferred, run the full-width program).

Speculative verification (the choice, matched by the test's dense replay): a step's rows all see the kept
set as it was before the step (plus the step's own tokens, causally); only rows certainly kept score (the
sequence's own token and prefill rows: positions < request.num_tokens when the step is built), so a draft
row adds no mass, accepted or not. Everything else waits for the verification (after_verify): the rejected
drafts roll back, then the 1 + accepted new tokens are taken in as one step, evicting one slot per token
over the budget (least mass among the live slots older than the window of the newest kept token), and the
holes are compacted as usual. Eviction never touches the newest `window` positions and compaction keeps
position order, so a rollback of up to `window` tokens trims the tail of every head (EngineConfig asks
window > k); the evictions and mass of rolled-back tokens (a draft twin's) are not undone.
"""

from __future__ import annotations

import functools

import numpy as np

from jaxinfer.engine.kv_policies import device
from jaxinfer.engine.kv_policies.attention import MaskRule
from jaxinfer.engine.kv_policies.base import EvictionPolicy
from jaxinfer.engine.kv_policies.registry import register


@register("h2o")
class H2OPolicy(EvictionPolicy):
  rule = MaskRule(scores=True)

  def __init__(self, config, model_config, engine_config):
    super().__init__(config, model_config, engine_config)
    self.prefill_select = functools.partial(device.h2o_select, window=config.window, keep=config.budget)
    self.live_select = functools.partial(device.live_select, keep=config.budget)
    self.visible: dict[int, int] = {}  # request id -> slots each (layer, head) still sees
    self.uncut: set[int] = set()  # requests whose cut to the budget at the end of prefill was deferred
    self.drafts = engine_config.max_rows_per_seq - 1  # most drafts one verification step appends
    self.unverified: dict[int, int] = {}  # request id -> start of its verification step awaiting after_verify

  def decode_table_pages(self, pages_per_seq: int) -> int | None:
    # after compaction: the budget's pages, plus up to page_size - 1 evicted holes and this step's token
    # (and its drafts)
    bound = -(-(self.config.budget + self.drafts) // self.page_size) + 2
    return bound if bound < pages_per_seq else None

  def row_weights(self, request, positions: np.ndarray) -> np.ndarray:
    return (positions < request.num_tokens).astype(np.float32)  # draft rows (past the known tokens): none

  def register_limit(self, request) -> int:
    return 0  # every prompt row scores: a prefix-cache hit would skip some, so nothing is named

  def forget(self, request) -> None:
    super().forget(request)
    self.visible.pop(request.request_id, None)
    self.uncut.discard(request.request_id)
    self.unverified.pop(request.request_id, None)

  def on_step(self, request, seq) -> None:
    if seq.num_draft:  # nothing is decided before the drafts are verified (after_verify)
      self.unverified[request.request_id] = seq.start
      return
    self.take_in(request, seq.start, seq.num_tokens)

  def after_verify(self, request) -> None:
    start = self.unverified.pop(request.request_id, None)
    if start is not None:
      self.take_in(request, start, request.num_computed - start)

  def check_rollback(self, request, n: int, end: int) -> None:
    super().check_rollback(request, n, end)
    if request.request_id in self.evicted and n > self.config.window:
      raise ValueError(f"rollback of {n} slots: kv_policy {self.name!r} keeps only the newest "
                       f"window={self.config.window} positions in every head")

  def on_rollback(self, request, n: int, end: int) -> None:
    super().on_rollback(request, n, end)
    rid = request.request_id
    if rid not in self.unverified and rid in self.visible:  # slots take_in counted already
      self.visible[rid] -= n

  def take_in(self, request, start: int, num_tokens: int) -> None:
    """The tokens at positions start .. start + num_tokens - 1 (certainly kept, written) join the request."""
    rid, budget = request.request_id, self.config.budget
    visible = self.visible.get(rid, start) + num_tokens
    end = start + num_tokens
    first_cut = end == self.prefill_end[rid] and rid not in self.evicted
    if (first_cut or rid in self.uncut) and visible > budget:
      # the prompt's cut to the budget; deferred (no free pages for the copy): nothing is evicted meanwhile
      # and each later step tries again, with the decode rows' mass added to the scores
      if self.compact_into_fresh_pages(request, budget, self.prefill_select):
        visible = budget
        self.uncut.discard(rid)
      else:
        self.uncut.add(rid)
    elif end > self.prefill_end[rid] and visible > budget:
      row = self.runner_row(request)
      for _ in range(min(num_tokens, visible - budget)):  # one per new token over the budget
        self.runner.pool = device.h2o_evict(self.runner.pool, np.int32(row), self.logical_slots(request.pages),
                                            np.int32(self.held[rid]), np.int32(end - 1), window=self.config.window)
        visible -= 1
      self.evicted.add(rid)
    self.visible[rid] = visible
    if self.held[rid] - visible >= self.page_size:  # holes left by evictions: only once cut, visible == budget
      if visible != budget:
        raise RuntimeError(f"request {rid}: {self.held[rid] - visible} holes with {visible} slots visible "
                           f"(budget {budget})")
      self.compact_into_fresh_pages(request, visible, self.live_select)

  def plain_view(self, request, end: int) -> bool:
    # every H2O row scores (row_weights 1), and a grouped row's mass over the shared prefix is not computed by
    # the prefix part: scoring sequences stay out of groups (h2o_unscored, which scores nothing, may join
    # while nothing is evicted). register_limit is 0 besides, so H2O requests never share prefix pages.
    return (not self.rule.scores and request.request_id not in self.evicted and self.layout_untouched(request))
