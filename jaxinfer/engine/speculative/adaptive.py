"""Adaptive speculation length (BASS-style): each sequence's k follows its own acceptance.

A sequence starts at the configured k; after a step whose drafts were all accepted its k grows by one (up to
num_speculative_tokens), after a step with a rejection it shrinks by one (down to min_speculative_tokens). A
sequence whose drafts keep failing so costs few wasted verification rows, one that keeps agreeing drafts far.
"""

from __future__ import annotations

from jaxinfer.engine.speculative.base import Proposer


class AdaptiveLength(Proposer):
  """Wraps a proposer, clipping each request's drafts to its own current k (k_min == k_max: a fixed cap)."""

  def __init__(self, inner: Proposer, k_max: int, k_min: int = 1):
    self.inner, self.k_max, self.k_min = inner, k_max, k_min
    self.k: dict[int, int] = {}  # request id -> its current k

  def __getattr__(self, name):
    # the inner proposer's other optional hooks (draft_parents, observe_head, ...) as they are
    if name == "inner":
      raise AttributeError(name)
    return getattr(self.inner, name)

  def current(self, request) -> int:
    return self.k.get(request.request_id, self.k_max)

  def prepare(self, requests, rooms, live_ids):
    self.k = {i: k for i, k in self.k.items() if i in live_ids}
    rooms = [min(room, self.current(r)) for r, room in zip(requests, rooms)]
    prepare = getattr(self.inner, "prepare", None)
    if prepare is not None:
      prepare(requests, rooms, live_ids)

  def propose(self, request, max_tokens: int) -> list[int]:
    return self.inner.propose(request, min(max_tokens, self.current(request)))

  def draft_probs(self, request):
    fn = getattr(self.inner, "draft_probs", None)
    return None if fn is None else fn(request)

  def observe(self, request, num_draft: int, num_accepted: int) -> None:
    k = self.current(request)
    self.k[request.request_id] = min(self.k_max, k + 1) if num_accepted == num_draft else max(self.k_min, k - 1)
    observe = getattr(self.inner, "observe", None)
    if observe is not None:
      observe(request, num_draft, num_accepted)
