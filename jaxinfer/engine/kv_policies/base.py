"""EvictionPolicy: the host side every KV policy shares (the kvpress "press" of a paged engine).

A kvpress press is a hook on the attention layer that scores the cached keys and prunes them; a jaxinfer
policy is the same idea split where a paged engine needs it:
  rule           a static MaskRule: what a query sees (positions, sinks/window, per-head streaming) and
                 whether the attention pass accumulates scores (attention.py, inside the step)
  row_weights    which query rows count in the score (SnapKV: the observation window; H2O: every row)
  on_step        after each dispatched step, per sequence: drop pages (StreamingLLM) or select + compact
                 slots on the device (SnapKV, H2O) and give the freed pages back to the allocator
  register_limit tokens whose pages the prefix cache may name (pages computed before any eviction only)
  decode_table_pages  optional: a narrower page table for steps whose sequences all fit in it (H2O after
                 compaction), a second compiled width of every step program
A new policy is a subclass in its own file registered with @register("name") (registry.py).

Layout: a request's pages hold `held` logical slots (slot i at page i // page_size, offset i % page_size);
new tokens are appended at logical `held`, so kv_len = held + new tokens. Compaction moves each (layer, kv
head)'s kept slots to the front of fresh pages, in position order.
"""

from __future__ import annotations

import numpy as np

from jaxinfer.engine.kv_policies.attention import MaskRule, PolicyState
from jaxinfer.engine.kv_policy import KVPolicy


class EvictionPolicy(KVPolicy):
  name = "base"
  rule = MaskRule()

  def __init__(self, config, model_config, engine_config):
    self.config = config
    self.model_config = model_config
    self.page_size = engine_config.page_size
    self.num_layers = model_config.num_layers
    self.kv_heads = model_config.num_kv_heads
    self.held: dict[int, int] = {}  # request id -> logical slots its pages hold
    self.prefill_end: dict[int, int] = {}  # request id -> tokens its (re)computed prefill covers
    self.evicted: set[int] = set()  # requests that dropped or moved a slot (their pages are never named)
    self.max_pages: dict[int, int] = {}  # request id -> most pages it held at once (tests, experiments)
    self.last_pages: dict[int, int] = {}  # request id -> pages it held after its latest step
    self.stats = {"evicted_pages": 0, "compactions": 0, "deferred_compactions": 0}
    self.runner = self.allocator = self.builder = None
    self.step_end: dict[int, int] = {}  # request id -> position after the last slot its latest step wrote
    self.stats["rollback_slots"] = 0  # held slots given up by rollbacks (rejected drafts, Scheduler.rollback)

  # ------------------------------------------------------------------ wiring (Engine)
  def bind(self, runner, allocator, builder) -> None:
    self.runner, self.allocator, self.builder = runner, allocator, builder

  def init_state(self, num_slots: int, rows: int, table_slots: int) -> PolicyState:
    return PolicyState.create(self.num_layers, num_slots, self.kv_heads, rows, table_slots)

  def layer_kv_heads(self, sharding) -> tuple | None:
    """KV heads the pool holds per layer (None: every head; duo keeps only its retrieval heads there)."""
    return None

  def table_pages(self, pages_per_seq: int) -> int:
    """Page-table width (most pages a request may hold at once)."""
    return pages_per_seq

  def decode_table_pages(self, pages_per_seq: int) -> int | None:
    """A narrower page-table width for steps whose every sequence holds at most that many pages (None: no
    narrow program). The builder picks it per step (BatchBuilder.table_width), so a request above the bound
    (a prefill, a deferred compaction) only sends its step to the full-width program."""
    return None

  # ------------------------------------------------------------------ layout
  def held_tokens(self, request) -> int:
    return self.held.get(request.request_id, request.num_computed)

  def kv_len(self, request, end: int) -> int:
    return self.held_tokens(request) + end - request.num_computed

  def slot_mapping(self, request, positions: np.ndarray) -> np.ndarray:
    ps = self.page_size
    logical = self.held_tokens(request) + positions - request.num_computed
    pages = np.asarray(request.pages, np.int32)
    if logical.size and logical.max() >= pages.size * ps:
      raise RuntimeError(f"request {request.request_id}: logical slot {int(logical.max())} has no page "
                         f"({pages.size} pages of {ps})")
    return pages[logical // ps] * ps + logical % ps

  def pages_needed(self, request, num_tokens: int) -> int:
    """Pages the request needs for its next num_tokens tokens (Scheduler._reserve)."""
    return -(-(self.held_tokens(request) + num_tokens) // self.page_size)

  def pages_for_request(self, num_tokens: int) -> int:
    """Most pages a request of num_tokens tokens holds at once (admission check)."""
    return -(-num_tokens // self.page_size)

  def register_limit(self, request) -> int:
    """Tokens whose full pages the prefix cache may name."""
    if request.request_id in self.evicted:
      return request.num_registered_pages * self.page_size
    return request.num_tokens

  def forget(self, request) -> None:
    """The request gave its pages back (finished, preempted): its layout starts again from nothing."""
    rid = request.request_id
    self.held.pop(rid, None)
    self.prefill_end.pop(rid, None)
    self.evicted.discard(rid)
    self.step_end.pop(rid, None)

  # ------------------------------------------------------------------ batch
  def step_arrays(self, t_pad: int, s_pad: int) -> dict:
    if not self.rule.scores:
      return {}
    return dict(policy_weights=np.zeros((t_pad,), np.float32), policy_reset=np.zeros((s_pad,), bool))

  def fill_rows(self, attn, i: int, request, offset: int, positions: np.ndarray) -> None:
    rid = request.request_id
    if rid not in self.prefill_end:
      self.prefill_end[rid] = request.num_tokens
    if self.rule.scores:
      attn.policy_weights[offset:offset + positions.size] = self.row_weights(request, positions)
      attn.policy_reset[i] = rid not in self.held

  def row_weights(self, request, positions: np.ndarray) -> np.ndarray:
    return np.zeros(positions.shape, np.float32)

  # ------------------------------------------------------------------ after each step
  def after_dispatch(self, schedule) -> None:
    for s in schedule.seqs:
      r = s.request
      if s.draft_parents is not None:  # tree drafts: their accepted path moves slots (not followed here)
        raise RuntimeError(f"request {r.request_id}: kv_policy {self.name!r} does not run with tree verification")
      self.held[r.request_id] = self.held.get(r.request_id, s.start) + s.num_tokens
      self.step_end[r.request_id] = s.start + s.num_tokens
      self.on_step(r, s)
      self.max_pages[r.request_id] = max(self.max_pages.get(r.request_id, 0), len(r.pages))
      self.last_pages[r.request_id] = len(r.pages)

  def on_step(self, request, seq) -> None:
    raise NotImplementedError

  # ------------------------------------------------------------------ helpers for policies that compact
  def logical_slots(self, pages) -> np.ndarray:
    """Physical slot of each logical slot of a page list, padded to the table width (pad: slot 0)."""
    ps = self.page_size
    width = self.runner.table.shape[1] * ps
    out = np.zeros((width,), np.int32)
    pages = np.asarray(pages, np.int32)
    out[:pages.size * ps] = (pages[:, None] * ps + np.arange(ps)).reshape(-1)
    return out

  def compact_into_fresh_pages(self, request, keep: int, select) -> bool:
    """Keeps `keep` slots per (layer, kv head) chosen on the device by select (see device.compact), moved in
    position order into fresh pages; the old pages go back. False (nothing done, counted) if the pool has
    too few free pages for the copy: the evicted slots then stay masked and the next step tries again."""
    n_new = -(-keep // self.page_size)
    if not self.allocator.can_allocate(n_new):
      self.stats["deferred_compactions"] += 1
      return False
    from jaxinfer.engine.kv_policies.device import compact

    rid = request.request_id
    new_pages = self.allocator.allocate(n_new)
    row = self.runner_row(request)
    self.runner.pool = compact(self.runner.pool, np.int32(row), self.logical_slots(request.pages),
                               self.logical_slots(new_pages)[:keep], np.int32(self.held[rid]),
                               np.int32(request.num_computed - 1), select=select, keep=keep)
    self.allocator.decref(request.pages)
    self.stats["evicted_pages"] += len(request.pages) - n_new
    request.pages = new_pages
    self.held[rid] = keep
    self.evicted.add(rid)
    self.stats["compactions"] += 1
    return True

  def runner_row(self, request) -> int:
    return self.builder.slot(request)

  # ------------------------------------------------------------------ shared-prefix (Hydragen) attention
  def plain_view(self, request, end: int) -> bool:
    """True when the request's queries of a step ending at `end` (decode: end = its position + 1) see exactly
    the plain causal view over its pages: every held slot visible, logical slot i holding position i, nothing
    evicted, moved or re-rotated, and its rows carry no score weight. Only then may the scheduler put it in a
    shared-prefix group (Scheduler._group), whose prefix part is plain attention over the prefix-cache pages.
    Default False: a policy opts in by stating its condition (streaming.py, snapkv.py, h2o.py)."""
    return False

  def layout_untouched(self, request) -> bool:
    """Nothing dropped or compacted: the request's pages hold its computed tokens in position order."""
    return self.held_tokens(request) == request.num_computed

  # ------------------------------------------------------------------ speculative verification, rollback
  # A verification step writes the drafts' k/v after the request's own token (held counts them at once); the
  # policy decides evictions from the certainly kept tokens only (certain_end), and once the drafts are
  # verified (Scheduler.trim -> on_verified) the rejected ones are rolled back: held falls by their number,
  # so their slots lie past kv_len (invisible) and the next tokens overwrite them.
  @staticmethod
  def certain_end(seq) -> int:
    """Position after the step's last certainly kept token (its drafts may still be rejected)."""
    return seq.start + seq.num_tokens - seq.num_draft

  def check_rollback(self, request, n: int, end: int) -> None:
    """ValueError if the request's n newest held slots cannot simply be dropped, keeping the tokens at
    positions < end (subclasses: what their evictions allow). Base: they must be held."""
    held = self.held_tokens(request)
    if not 0 <= n <= held:
      raise ValueError(f"rollback of {n} slots: request {request.request_id} holds {held}")

  def on_rollback(self, request, n: int, end: int) -> None:
    """The request's n newest held slots leave (rejected drafts, Scheduler.rollback), the tokens at positions
    < end stay: held falls by n; the slots become invisible (past kv_len) and are rewritten by the tokens
    that follow (the next one at position end)."""
    self.check_rollback(request, n, end)
    if n:
      self.held[request.request_id] = self.held_tokens(request) - n
      self.stats["rollback_slots"] += n

  def on_verified(self, request) -> None:
    """The request's drafts were verified (request.num_computed counts the accepted ones): the rejected
    ones roll back, then after_verify does what the policy left for this moment."""
    rejected = self.step_end.get(request.request_id, request.num_computed) - request.num_computed
    if rejected < 0:
      raise RuntimeError(f"request {request.request_id}: {request.num_computed} tokens computed, its latest "
                         f"step wrote up to {self.step_end[request.request_id]}")
    self.on_rollback(request, rejected, request.num_computed)
    self.step_end[request.request_id] = request.num_computed
    self.after_verify(request)

  def after_verify(self, request) -> None:
    """Hook: work a policy defers from a verification step's on_step until its drafts are verified."""
