"""OutputProcessor: turns a finished step's samples into request state and RequestOutputs.

Per sequence of the step, in order: requests that finished or were cancelled meanwhile are skipped (their
rows are stale: async scheduling ran one more step for them); a sequence that sampled nothing (mid-prefill)
counts a partial prefill; otherwise its sampled rows are verified (jaxinfer/engine/speculative/: by exact
match, the draft tokens the samples confirm are accepted, then the first sample that differs; or, when the
proposer reports its draft distributions and the request samples, by speculative sampling against the
target's row distributions), stop tokens and max_new_tokens cut the accepted tokens, logprobs are kept when
the request asked for them, and the request finishes with "stop" or "length" or goes on.

Speculative counters (engine.stats): spec_draft_tokens drafts verified, spec_accepted_tokens of them accepted,
spec_verify_steps sequence-verifications (one per sequence per step that verified drafts).
"""

from __future__ import annotations

import numpy as np

from jaxinfer.engine.request import LENGTH, STOP, RequestOutput, Status
from jaxinfer.engine.speculative import accept
from jaxinfer.engine.speculative.sampling import speculative_accept
from jaxinfer.engine.speculative.tree import accept_tree, typical_accept_tree


class OutputProcessor:
  def __init__(self, scheduler, stats: dict, finish, slot_mapping=None):
    self.scheduler = scheduler
    self.stats = stats
    self._finish = finish  # engine callback: release the request and record its finish reason
    self._slot_mapping = slot_mapping  # (request, positions) -> pool slots (the batch builder's layout)
    self._moves: list[tuple[int, int]] = []  # (src, dst) slots: accepted tree paths to move into place

  def take_moves(self) -> list[tuple[int, int]]:
    moves, self._moves = self._moves, []
    return moves

  def _verify(self, s, row: int, k: int, samples: list[int], probs) -> tuple[list[int], list[int]]:
    """(accepted tokens, the accepted drafts' indices): the tokens end with the sample after the last
    accepted draft, which came from sample row 1 + path[-1] (row 0 if none)."""
    r = s.request
    if not s.num_draft:
      return samples[:1], []
    if s.draft_parents is not None:  # a candidate tree (Medusa)
      typical = getattr(self.scheduler.proposer, "typical", None)
      if typical is not None and probs is not None and r.sampling.temperature > 0:
        return typical_accept_tree(s.draft_tokens, s.draft_parents, samples, probs[row:row + k], *typical)
      return accept_tree(s.draft_tokens, s.draft_parents, samples)
    new = self._verify_chain(s, row, k, samples, probs)
    return new, list(range(len(new) - 1))

  def _move_path(self, s, path: list[int]) -> None:
    """Accepted node path[j] was written at the slot of position root + 1 + path[j]; it belongs at root + 1 + j."""
    root = s.start + s.num_tokens - s.num_draft - 1
    pairs = [(root + 1 + node, root + 1 + j) for j, node in enumerate(path) if node != j]
    if pairs:
      src, dst = (np.asarray(x, np.int32) for x in zip(*pairs))
      r = s.request
      self._moves += list(zip(self._slot_mapping(r, src).tolist(), self._slot_mapping(r, dst).tolist()))

  def _verify_chain(self, s, row: int, k: int, samples: list[int], probs) -> list[int]:
    r = s.request
    q = None
    if probs is not None and r.sampling.temperature > 0:
      fn = getattr(self.scheduler.proposer, "draft_probs", None)
      q = fn(r) if fn is not None else None
    if q is None:  # deterministic drafts or greedy: exact match against the model's own samples
      return accept(s.draft_tokens, samples)
    first = s.start + s.num_tokens - s.num_draft  # position of the first draft token
    return speculative_accept(s.draft_tokens, q[:s.num_draft], probs[row:row + k], samples[-1], r.sampling.seed,
                              first)

  def process(self, built, tokens: np.ndarray, logprobs: np.ndarray | None, probs: np.ndarray | None = None,
              head: np.ndarray | None = None) -> list[RequestOutput]:
    """head: the step's row-head output per sampled row (Medusa's guesses), given to the proposer for the row
    that sampled each request's newest token."""
    outputs = []
    observe_head = getattr(self.scheduler.proposer, "observe_head", None) if head is not None else None
    for s, (row, k) in zip(built.seqs, built.sample_rows):
      r = s.request
      if not k:
        if r.status is not Status.FINISHED:
          self.stats["partial_prefills"] += 1
        continue
      r.num_inflight -= 1
      if r.status is Status.FINISHED:
        continue  # finished or cancelled while this step ran: its rows are stale
      samples = tokens[row:row + k].tolist()
      new, path = self._verify(s, row, k, samples, probs)
      if s.draft_parents is not None:
        self._move_path(s, path)
      if s.num_draft:
        r.num_computed += len(new) - 1  # accepted drafts: their k/v (computed this step) is valid
        self.stats["spec_draft_tokens"] += s.num_draft
        self.stats["spec_accepted_tokens"] += len(new) - 1
        self.stats["spec_verify_steps"] += 1
        observe = getattr(self.scheduler.proposer, "observe", None)
        if observe is not None:
          observe(r, s.num_draft, len(new) - 1)
      reason = None
      kept = []
      for token in new:
        kept.append(token)
        if token in r.stop_token_ids:
          reason = STOP
          break
        if len(r.output) + len(kept) >= r.max_new_tokens:
          reason = LENGTH
          break
      r.output.extend(kept)
      rows = [row] + [row + 1 + node for node in path]  # the sample row of each accepted token
      lp = logprobs[rows[:len(kept)]].tolist() if logprobs is not None else [0.0] * len(kept)
      r.logprobs.extend(lp)
      self.stats["generated_tokens"] += len(kept)
      if reason is not None:
        self._finish(r, reason)
      else:
        if s.num_draft:
          self.scheduler.trim(r)
        self.scheduler.register_computed(r)
        if observe_head is not None:
          observe_head(r, head[rows[-1]])
      outputs.append(RequestOutput(r.request_id, kept, reason is not None, reason,
                                   lp if r.sampling.logprobs else None,
                                   list(probs[rows[:len(kept)]]) if probs is not None else None))
    return outputs
