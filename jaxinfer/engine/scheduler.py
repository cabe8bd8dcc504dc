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
"""

from __future__ import annotations

import bisect
import dataclasses

from jaxinfer.engine.allocator import PageAllocator
from jaxinfer.engine.request import Request, Status


@dataclasses.dataclass
class ScheduledSeq:
  request: Request
  num_tokens: int  # tokens run through the model for it this step
  start: int  # position of the first of them

  @property
  def samples(self) -> bool:
    """After this step all its tokens are computed, so a new token is sampled from its last row."""
    return self.start + self.num_tokens == self.request.num_tokens


@dataclasses.dataclass
class Schedule:
  seqs: list[ScheduledSeq]
  preempted: list[Request]

  @property
  def num_tokens(self) -> int:
    return sum(s.num_tokens for s in self.seqs)


class Scheduler:
  def __init__(self, allocator: PageAllocator, *, page_size: int, max_batch_size: int, max_step_tokens: int,
               chunked_prefill: bool = True):
    self.allocator = allocator
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

  def _preempt(self, request: Request) -> None:
    self.running.remove(request)
    self._free_pages(request)
    request.num_computed = 0  # recomputed from scratch: prompt + the tokens generated so far
    request.num_preemptions += 1
    self.num_preemptions += 1
    self.add(request)

  # ------------------------------------------------------------------ one step
  def schedule(self) -> Schedule:
    budget = self.max_step_tokens
    seqs: list[ScheduledSeq] = []
    scheduled: set[int] = set()
    preempted: list[Request] = []

    decoding = [r for r in self.running if r.num_pending == 1]
    prefilling = [r for r in self.running if r.num_pending > 1]
    for request in decoding + prefilling:
      if request.status is not Status.RUNNING:
        continue  # preempted earlier in this loop
      if budget <= 0:
        break
      n = min(request.num_pending, budget) if self.chunked_prefill else request.num_pending
      if n > budget:
        continue
      while not self._reserve(request, n):
        victim = next(r for r in reversed(self.running) if r.request_id not in scheduled)
        self._preempt(victim)
        preempted.append(victim)
        if victim is request:
          break
      if request.status is Status.RUNNING:
        seqs.append(ScheduledSeq(request, n, request.num_computed))
        scheduled.add(request.request_id)
        budget -= n

    # admission; not in a step that had to preempt (the pool is tight: let the running requests drain first)
    while self.waiting and not preempted and budget > 0 and len(self.running) < self.max_batch_size:
      request = self.waiting[0]
      n = request.num_pending
      if self.chunked_prefill:
        n = min(n, budget)
      elif n > budget:
        break
      if not self._reserve(request, n):
        break  # admission never preempts: it waits for pages to come back
      self.waiting.pop(0)
      if request.num_preemptions == 0:
        self._num_new_waiting -= 1
      request.status = Status.RUNNING
      bisect.insort(self.running, request, key=lambda r: r.arrival)
      seqs.append(ScheduledSeq(request, n, request.num_computed))
      scheduled.add(request.request_id)
      budget -= n
    return Schedule(seqs, preempted)
