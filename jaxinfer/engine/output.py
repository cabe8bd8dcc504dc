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


class OutputProcessor:
  def __init__(self, scheduler, stats: dict, finish):
    self.scheduler = scheduler
    self.stats = stats
    self._finish = finish  # engine callback: release the request and record its finish reason

  def _verify(self, s, row: int, k: int, samples: list[int], probs) -> list[int]:
    r = s.request
    if not s.num_draft:
      return samples[:1]
    q = None
    if probs is not None and r.sampling.temperature > 0:
      fn = getattr(self.scheduler.proposer, "draft_probs", None)
      q = fn(r) if fn is not None else None
    if q is None:  # deterministic drafts or greedy: exact match against the model's own samples
      return accept(s.draft_tokens, samples)
    first = s.start + s.num_tokens - s.num_draft  # position of the first draft token
    return speculative_accept(s.draft_tokens, q[:s.num_draft], probs[row:row + k], samples[-1], r.sampling.seed,
                              first)

  def process(self, built, tokens: np.ndarray, logprobs: np.ndarray | None, probs: np.ndarray | None = None
              ) -> list[RequestOutput]:
    outputs = []
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
      new = self._verify(s, row, k, samples, probs)
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
      lp = logprobs[row:row + len(kept)].tolist() if logprobs is not None else [0.0] * len(kept)
      r.logprobs.extend(lp)
      self.stats["generated_tokens"] += len(kept)
      if reason is not None:
        self._finish(r, reason)
      else:
        if s.num_draft:
          self.scheduler.trim(r)
        self.scheduler.register_computed(r)
      outputs.append(RequestOutput(r.request_id, kept, reason is not None, reason,
                                   lp if r.sampling.logprobs else None,
                                   list(probs[row:row + len(kept)]) if probs is not None else None))
    return outputs
