"""Iteration-level scheduler: which requests run in the next step, with how many tokens each.

Every step (Orca-style continuous batching, Sarathi-Serve-style chunked prefill, vLLM-style paging):
  1. running requests that are decoding get their one token first, so decodes never stall behind a prompt;
  2. running requests part-way through their prefill get the next chunk of what is left of the token budget;
  3. waiting requests (preempted ones first: the queue is ordered by arrival) are admitted while the budget,
     the batch size and the free pages allow (none in a step that had to preempt).
When a running request needs a page and none is free, the latest-arrived running request not yet scheduled
in this step (possibly the one asking) is preempted: its pages are freed and it goes back to the waiting
queue with its generated tokens, to be recomputed later by prefilling prompt + generated tokens. Victims are
always later arrivals, so the earliest running request can always proceed: nothing starves and nothing is lost.

With chunked_prefill=False a prompt is only ever scheduled whole (for the serving comparison); the budget
must then hold a whole max-length prompt beside a full batch of decodes.

Prefix caching (prefix_caching=True, with a PrefixCachingAllocator): on admission a request takes references
on the cached pages of its longest cached prefix and starts its prefill after them, always leaving at least
its last token to compute (its logits are needed). When the cached prefix ends inside a page (divergence
inside a page, or a fully cached prompt whose last page holds that last token) the best matching cached page
is copied into a fresh page of the request's own (copy-on-write: the copy is in Schedule.copies, applied
before the step; the source is pinned until then) and its common tokens are not recomputed. A sequence so
never writes into a page anyone else holds: shared pages are full and already computed. Every full page a
step completes is named in the cache as it is scheduled.

Prefix groups (group_prefixes=True): decoding sequences whose page tables start with the same physical pages
are put in contiguous rows, one Schedule.groups entry per group (at most max_prefix_groups, the largest
savings first), so the step can attend over each shared prefix once for the whole group.
"""

from __future__ import annotations

import bisect
import dataclasses

import numpy as np

from jaxinfer.engine.allocator import PageAllocator
from jaxinfer.engine.prefix_cache import ROOT_HASH, PrefixCachingAllocator, page_hash
from jaxinfer.engine.request import Request, Status


@dataclasses.dataclass
class ScheduledSeq:
  request: Request
  num_tokens: int  # tokens run through the model for it this step (draft tokens included)
  start: int  # position of the first of them
  draft_tokens: list[int] = dataclasses.field(default_factory=list)  # proposed tokens to verify, after its own
  # a candidate tree (Medusa): parent of each draft among the drafts, -1 = the sequence's own last token;
  # None: the drafts are a chain (each follows the one before)
  draft_parents: list[int] | None = None

  @property
  def num_draft(self) -> int:
    return len(self.draft_tokens)

  @property
  def is_tree(self) -> bool:
    """Its drafts branch (a candidate tree), so they cannot be verified as one causal chain."""
    return self.draft_parents is not None and any(p != i - 1 for i, p in enumerate(self.draft_parents))

  @property
  def samples(self) -> bool:
    """After this step all its tokens are computed, so a new token is sampled from its last row."""
    return self.start + self.num_tokens - self.num_draft == self.request.num_tokens

  @property
  def num_samples(self) -> int:
    """Rows sampled: its last row, plus one per draft token (0 while mid-prefill)."""
    return 1 + self.num_draft if self.samples else 0


@dataclasses.dataclass
class PrefixGroup:
  """Schedule.seqs[first:first + num_seqs] are decodes whose page tables start with the same num_pages pages."""
  first: int
  num_seqs: int
  num_pages: int


@dataclasses.dataclass
class Schedule:
  seqs: list[ScheduledSeq]
  preempted: list[Request]
  copies: list[tuple[int, int]] = dataclasses.field(default_factory=list)  # (src, dst) pages, before the step
  groups: list[PrefixGroup] = dataclasses.field(default_factory=list)

  @property
  def num_tokens(self) -> int:
    return sum(s.num_tokens for s in self.seqs)


class Scheduler:
  def __init__(self, allocator: PageAllocator, *, page_size: int, max_batch_size: int, max_step_tokens: int,
               chunked_prefill: bool = True, prefix_caching: bool = False, group_prefixes: bool = False,
               max_prefix_groups: int = 4, min_shared_prefix_pages: int = 1, proposer=None,
               max_rows_per_seq: int = 1, max_model_len: int | None = None, kv_policy=None):
    if prefix_caching and not isinstance(allocator, PrefixCachingAllocator):
      raise ValueError("prefix_caching needs a PrefixCachingAllocator")
    self.allocator = allocator
    self.kv_policy = kv_policy  # an EvictionPolicy (jaxinfer/engine/kv_policies) or None
    self.proposer = proposer  # speculative decoding: draft tokens for decodes (jaxinfer/engine/speculative.py)
    self.max_rows_per_seq = max_rows_per_seq
    self.max_model_len = max_model_len
    self.prefix_caching = prefix_caching
    self.group_prefixes = group_prefixes
    self.max_prefix_groups = max_prefix_groups
    self.min_shared_prefix_pages = max(1, min_shared_prefix_pages)
    # prefix-cache counters: admissions looked up, admissions that reused tokens, tokens reused, page copies
    self.prefix_queries = 0
    self.prefix_hits = 0
    self.prefix_hit_tokens = 0
    self.cow_copies = 0
    self._pinned: list[int] = []  # sources of this step's copies, held until the copy has run
    self._pending: set[int] = set()  # pages named in the cache by this schedule (computed by its step)
    self.page_size = page_size
    self.max_batch_size = max_batch_size
    self.max_step_tokens = max_step_tokens
    self.chunked_prefill = chunked_prefill
    self.waiting: list[Request] = []  # ordered by arrival
    self.running: list[Request] = []  # ordered by arrival
    self.num_preemptions = 0
    self._num_new_waiting = 0  # waiting requests never admitted yet

  # ------------------------------------------------------------------ queue management
  def add(self, request: Request) -> None:
    request.status = Status.WAITING
    bisect.insort(self.waiting, request, key=lambda r: r.arrival)
    if request.num_preemptions == 0:
      self._num_new_waiting += 1

  def num_new_waiting(self) -> int:
    """Waiting requests that were never admitted (preempted ones were accepted already and always come back)."""
    return self._num_new_waiting

  def has_unfinished(self) -> bool:
    return bool(self.waiting or self.running)

  def release(self, request: Request) -> None:
    """Takes a request out of the queues (finished or cancelled) and drops its page references."""
    if request.status is Status.RUNNING:
      self.running.remove(request)
    elif request.status is Status.WAITING:
      self.waiting.remove(request)
      if request.num_preemptions == 0:
        self._num_new_waiting -= 1
    self._free_pages(request)
    request.status = Status.FINISHED

  # ------------------------------------------------------------------ pages
  def pages_for(self, num_tokens: int) -> int:
    return -(-num_tokens // self.page_size)

  def _reserve(self, request: Request, num_tokens: int) -> bool:
    """Makes sure the request's pages cover its next num_tokens tokens; False (taking nothing) if they can't."""
    if self.kv_policy is not None:
      need = self.kv_policy.pages_needed(request, num_tokens) - len(request.pages)
    else:
      need = self.pages_for(request.num_computed + num_tokens) - len(request.pages)
    if need <= 0:
      return True
    if not self.allocator.can_allocate(need):
      return False
    request.pages.extend(self.allocator.allocate(need))
    return True

  def _free_pages(self, request: Request) -> None:
    if request.pages:
      self.allocator.decref(request.pages)
    request.pages = []
    if self.kv_policy is not None:
      self.kv_policy.forget(request)

  def release_copy_sources(self) -> None:
    """Drops the pins on this step's copy-on-write sources (call once the copy has been issued)."""
    if self._pinned:
      self.allocator.decref(self._pinned)
      self._pinned = []

  # ------------------------------------------------------------------ prefix cache
  def _hashes(self, request: Request, num_pages: int) -> list[int]:
    """Chain hashes of the request's first num_pages full pages (computed once, kept across preemption)."""
    hs, ps = request.page_hashes, self.page_size
    while len(hs) < num_pages:
      i = len(hs)
      hs.append(page_hash(hs[-1] if hs else ROOT_HASH, request.token_slice(i * ps, (i + 1) * ps)))
    return hs

  def _match(self, request: Request):
    """(cached pages of its longest cached prefix of full pages, (source page, tokens) of the best partial
    match of the page after them or None), never covering the request's last token."""
    ps, cache = self.page_size, self.allocator
    limit = request.num_tokens - 1  # the last token is always computed: its logits give the next token
    full: list[int] = []
    parent = ROOT_HASH
    for i in range(limit // ps):
      h = self._hashes(request, i + 1)[i]
      page = cache.lookup(h, parent, tuple(request.token_slice(i * ps, (i + 1) * ps)))
      if page is None:
        break
      full.append(page)
      parent = h
    partial = None
    start = len(full) * ps
    if start < limit:
      src, m = cache.best_partial(parent, request.token_slice(start, min(start + ps, limit)), exclude=self._pending)
      if m > 0:
        partial = (src, m)
    return full, partial

  def _register(self, request: Request, num_tokens: int) -> None:
    """Names in the cache the request's full pages among its first num_tokens tokens (computed by this step
    or before). Only tokens the host knows are named (not those still on the device, never draft tokens)."""
    ps, cache = self.page_size, self.allocator
    if self.kv_policy is not None:  # pages holding evicted or moved slots are never named
      num_tokens = min(num_tokens, self.kv_policy.register_limit(request))
    n = min(min(num_tokens, request.num_resolved) // ps, len(request.pages))
    if n <= request.num_registered_pages:
      return
    hs = self._hashes(request, n)
    for i in range(request.num_registered_pages, n):
      page = request.pages[i]
      if cache.register(page, hs[i], hs[i - 1] if i else ROOT_HASH,
                        tuple(request.token_slice(i * ps, (i + 1) * ps))):
        self._pending.add(page)
    request.num_registered_pages = n

  def _admission_plan(self, request: Request, budget: int):
    """(cached full pages, partial match or None, tokens to run, fresh pages) for admitting the request now,
    or None if it does not fit. Falls back to no partial reuse when the copy's pinned source would not fit."""
    n_total = request.num_tokens
    if self.prefix_caching:
      full, partial = self._match(request)
      options = ([(full, partial)] if partial else []) + [(full, None)]
    else:
      options = [([], None)]
    for full, partial in options:
      reuse = len(full) * self.page_size + (partial[1] if partial else 0)
      n = n_total - reuse
      if self.chunked_prefill:
        n = min(n, budget)
      elif n > budget:
        continue
      fresh = self.pages_for(reuse + n) - len(full)
      if self.prefix_caching:
        revive = sum(1 for p in full if self.allocator.refcount(p) == 0)
        revive += 1 if partial and self.allocator.refcount(partial[0]) == 0 else 0
        if fresh + revive <= self.allocator.num_free:
          return full, partial, n, fresh
      elif self.allocator.can_allocate(fresh):
        return full, partial, n, fresh
    return None

  def _admit(self, request: Request, plan, copies: list) -> int:
    """Takes the pages of an admission plan; returns the tokens to run."""
    full, partial, n, fresh = plan
    if self.prefix_caching:
      self.allocator.acquire(full)
      if partial:
        self.allocator.acquire([partial[0]])
        self._pinned.append(partial[0])
    request.pages = list(full) + self.allocator.allocate(fresh)
    reuse = len(full) * self.page_size + (partial[1] if partial else 0)
    request.num_computed = reuse
    request.num_registered_pages = len(full)
    request.num_cached_tokens = reuse
    if partial:
      copies.append((partial[0], request.pages[len(full)]))
      self.cow_copies += 1
    if self.prefix_caching:
      self.prefix_queries += 1
      self.prefix_hits += reuse > 0
      self.prefix_hit_tokens += reuse
    return n

  # ------------------------------------------------------------------ prefix groups
  def _group(self, seqs: list[ScheduledSeq]) -> tuple[list[ScheduledSeq], list[PrefixGroup]]:
    """Reorders seqs so that decodes sharing their first pages are contiguous; returns them and the groups.

    Decodes are bucketed by their first page. In a bucket, the member with the longest computed prefix is the
    reference; each other member's shared length with it is measured, and the group takes the prefix length
    n that saves the most prefix reads ((members - 1) * n) together with every member sharing at least n
    pages. The rest of the bucket is grouped again the same way, so a tree of prefixes (a system prompt, then
    a few longer shared contexts under it) becomes several groups, each sequence in at most one."""
    ps = self.page_size
    by_first: dict[int, list[int]] = {}
    for i, s in enumerate(seqs):
      # only decodes: every page wholly before the new token is computed (and a shared page is always full)
      if s.num_tokens == 1 and s.start // ps >= self.min_shared_prefix_pages and self._plain_view(s):
        by_first.setdefault(s.request.pages[0], []).append(i)
    found = []
    for members in by_first.values():
      while len(members) >= 2:
        ref = max(members, key=lambda i: seqs[i].start)
        n_ref = seqs[ref].start // ps
        ref_pages = np.asarray(seqs[ref].request.pages[:n_ref])
        common = {}
        for i in members:
          if i != ref:
            n = min(n_ref, seqs[i].start // ps)
            differ = np.flatnonzero(np.asarray(seqs[i].request.pages[:n]) != ref_pages[:n])
            common[i] = int(differ[0]) if differ.size else n
        best = None
        for n in sorted(set(common.values()), reverse=True):
          saved = n * sum(1 for c in common.values() if c >= n)
          if n >= self.min_shared_prefix_pages and (best is None or saved > best[0]):
            best = (saved, n)
        if best is None:
          break
        chosen = sorted([ref] + [i for i, c in common.items() if c >= best[1]])
        found.append((best[0], chosen, best[1]))
        members = [i for i in members if i not in chosen]
    if not found:
      return seqs, []
    found.sort(key=lambda f: (-f[0], f[1][0]))
    order: list[int] = []
    groups = []
    for _, members, n in found[:self.max_prefix_groups]:
      groups.append(PrefixGroup(len(order), len(members), n))
      order.extend(members)
    grouped = set(order)
    order.extend(i for i in range(len(seqs)) if i not in grouped)
    return [seqs[i] for i in order], groups

  def _plain_view(self, s: ScheduledSeq) -> bool:
    """A KV policy lets a sequence join a group only while it sees the plain causal view over its pages (so
    its shared pages are the unmodified prefix-cache pages); the others take the policy's own path."""
    return self.kv_policy is None or self.kv_policy.plain_view(s.request, s.start + s.num_tokens)

  def register_computed(self, request: Request) -> None:
    """Names the request's full computed pages whose tokens became known since they were scheduled (async
    scheduling, accepted draft tokens). Their steps were dispatched before any later step that may read them."""
    if self.prefix_caching and request.status is Status.RUNNING:
      self._register(request, request.num_computed)

  def rollback(self, request: Request, n: int) -> list[int]:
    """Discards the last n generated tokens of a request; returns the pages given back to the pool.

    The token before them is computed again (its logits give the next token). A page the cache names is never
    written again: if the cut falls inside (or just after) a named page, that page is dropped from the request
    (others may still share it) and its kept tokens are recomputed into a fresh page."""
    if not 0 <= n <= len(request.output):
      raise ValueError(f"rollback of {n} tokens: the request has {len(request.output)} generated tokens")
    if request.num_inflight:
      raise RuntimeError(f"rollback of request {request.request_id} while its tokens are still on the device")
    if n == 0:
      return []
    new_len = request.num_tokens - n
    ps = self.page_size
    untouched = (new_len - 1) // ps  # full pages wholly before the last kept token
    rewrite_named = request.num_registered_pages > untouched
    new_computed = min(request.num_computed, untouched * ps if rewrite_named else new_len - 1)
    policy = self.kv_policy
    if policy is not None:  # the policy drops its newest slots, or refuses (ValueError) before anything changes
      if rewrite_named and policy.held_tokens(request) != request.num_computed:
        raise ValueError(f"the cut falls in a page the prefix cache names and kv_policy {policy.name!r} moved or "
                         "dropped slots before it (its kept tokens cannot be recomputed in place)")
      policy.check_rollback(request, request.num_computed - new_computed, new_computed)
    del request.output[-n:]
    del request.logprobs[-n:]
    if policy is not None:
      policy.on_rollback(request, request.num_computed - new_computed, new_computed)
    if rewrite_named:
      keep_pages = untouched
      request.num_registered_pages = untouched
    elif policy is not None:
      keep_pages = policy.pages_needed(request, new_len - new_computed)
    else:
      keep_pages = self.pages_for(new_len)
    request.num_computed = new_computed
    del request.page_hashes[untouched:]
    released = request.pages[keep_pages:]
    request.pages = request.pages[:keep_pages]
    if released:
      self.allocator.decref(released)
    return released

  def trim(self, request: Request) -> None:
    """Gives back pages beyond the request's tokens (after its draft tokens were verified; a KV policy first
    rolls back the rejected ones' slots, EvictionPolicy.on_verified)."""
    if self.kv_policy is not None and request.status is Status.RUNNING:
      self.kv_policy.on_verified(request)
      keep = self.kv_policy.pages_needed(request, request.num_tokens - request.num_computed)
    else:
      keep = self.pages_for(request.num_tokens)
    if request.status is Status.RUNNING and len(request.pages) > keep:
      released = request.pages[keep:]
      request.pages = request.pages[:keep]
      self.allocator.decref(released)

  def _drafts(self, request: Request, budget: int) -> tuple[list[int], list[int] | None]:
    """Draft tokens to verify beside a decode (none without a proposer), and their tree parents (None: a
    chain). A tree is clipped like a chain: its first `room` nodes (breadth first) are still a tree."""
    if self.proposer is None or self.max_rows_per_seq <= 1 or request.num_inflight:
      return [], None
    room = min(self.max_rows_per_seq - 1, budget - 1, request.max_new_tokens - len(request.output) - 1)
    if self.max_model_len is not None:
      room = min(room, self.max_model_len - request.num_tokens - 1)
    if room <= 0:
      return [], None
    drafts = list(self.proposer.propose(request, room))[:room]
    tree = getattr(self.proposer, "draft_parents", None)
    parents = tree(request) if tree is not None and drafts else None
    return drafts, None if parents is None else list(parents)[:len(drafts)]

  def _prepare_drafts(self, decoding: list[Request]) -> None:
    """A batched proposer (a draft model) drafts for every decode of this schedule at once, before it."""
    prepare = getattr(self.proposer, "prepare", None)
    if prepare is None or self.max_rows_per_seq <= 1:
      return
    rooms = []
    for r in decoding:
      room = min(self.max_rows_per_seq - 1, self.max_step_tokens - 1, r.max_new_tokens - len(r.output) - 1)
      if self.max_model_len is not None:
        room = min(room, self.max_model_len - r.num_tokens - 1)
      rooms.append(room if not r.num_inflight else 0)
    prepare(decoding, rooms, {r.request_id for r in self.running + self.waiting})

  def dispatched(self, schedule: Schedule) -> None:
    """The schedule's step was handed to the device: its tokens count as computed (the next schedule follows
    it), and each sampling sequence has one token on the device until its results are processed."""
    for s in schedule.seqs:
      s.request.num_computed = s.start + s.num_tokens - s.num_draft
      if s.samples:
        s.request.num_inflight += 1

  def preempt(self, request: Request) -> None:
    """Preempts a running request now (its pages go back; it is recomputed when admitted again)."""
    if request.status is not Status.RUNNING:
      raise ValueError(f"preempt: request {request.request_id} is not running")
    self._preempt(request)

  def _preempt(self, request: Request) -> None:
    self.running.remove(request)
    self._free_pages(request)
    request.num_computed = 0  # recomputed from scratch: prompt + the tokens generated so far
    request.num_registered_pages = 0
    request.num_preemptions += 1
    self.num_preemptions += 1
    self.add(request)

  # ------------------------------------------------------------------ one step
  def schedule(self) -> Schedule:
    budget = self.max_step_tokens
    seqs: list[ScheduledSeq] = []
    scheduled: set[int] = set()
    preempted: list[Request] = []
    copies: list[tuple[int, int]] = []
    self.release_copy_sources()  # normally done by the engine right after the previous step
    self._pending = set()

    # requests whose every token has been asked for (results still running) are left out
    active = [r for r in self.running if not r.done_scheduling]
    decoding = [r for r in active if r.num_pending == 1]
    prefilling = [r for r in active if r.num_pending > 1]
    self._prepare_drafts(decoding)
    for request in decoding + prefilling:
      if request.status is not Status.RUNNING:
        continue  # preempted earlier in this loop
      if budget <= 0:
        break
      n = min(request.num_pending, budget) if self.chunked_prefill else request.num_pending
      if n > budget:
        continue
      drafts, parents = self._drafts(request, budget) if request.num_pending == 1 else ([], None)
      if drafts and not self._reserve(request, n + len(drafts)):
        drafts, parents = [], None  # drafts never cost anyone else their pages
      n += len(drafts)
      while not self._reserve(request, n):
        victim = next(r for r in reversed(self.running) if r.request_id not in scheduled)
        self._preempt(victim)
        preempted.append(victim)
        if victim is request:
          break
      if request.status is Status.RUNNING:
        seqs.append(ScheduledSeq(request, n, request.num_computed, drafts, parents if drafts else None))
        scheduled.add(request.request_id)
        budget -= n
        if self.prefix_caching:
          self._register(request, request.num_computed + n - len(drafts))

    # admission; not in a step that had to preempt (the pool is tight: let the running requests drain first)
    while self.waiting and not preempted and budget > 0 and len(self.running) < self.max_batch_size:
      request = self.waiting[0]
      if request.num_inflight:
        break  # preempted while its newest token was still on the device: wait until it is known
      plan = self._admission_plan(request, budget)
      if plan is None:
        break  # admission never preempts: it waits for pages (or budget) to come back
      n = self._admit(request, plan, copies)
      self.waiting.pop(0)
      if request.num_preemptions == 0:
        self._num_new_waiting -= 1
      request.status = Status.RUNNING
      bisect.insort(self.running, request, key=lambda r: r.arrival)
      seqs.append(ScheduledSeq(request, n, request.num_computed))
      scheduled.add(request.request_id)
      budget -= n
      if self.prefix_caching:
        self._register(request, request.num_computed + n)
    groups: list[PrefixGroup] = []
    if self.group_prefixes and len(seqs) > 1:
      seqs, groups = self._group(seqs)
    return Schedule(seqs, preempted, copies, groups)
