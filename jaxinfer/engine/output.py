"""OutputProcessor: turns a finished step's samples into request state and RequestOutputs.

Per sequence of the step, in order: requests that finished or were cancelled meanwhile are skipped (their
rows are stale: async scheduling ran one more step for them); a sequence that sampled nothing (mid-prefill)
counts a partial prefill; otherwise its sampled rows are verified (jaxinfer/engine/speculative.py: the draft
tokens the samples confirm are accepted, then the first sample that differs), stop tokens and max_new_tokens
cut the accepted tokens, logprobs are kept when the request asked for them, and the request finishes with
"stop" or "length" or goes on.
"""

from __future__ import annotations

import numpy as np

from jaxinfer.engine.request import LENGTH, STOP, RequestOutput, Status
from jaxinfer.engine.speculative import accept


class OutputProcessor:
  def __init__(self, scheduler, stats: dict, finish):
    self.scheduler = scheduler
    self.stats = stats
    self._finish = finish  # engine callback: release the request and record its finish reason

  def process(self, built, tokens: np.ndarray, logprobs: np.ndarray | None) -> list[RequestOutput]:
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
      new = accept(s.draft_tokens, samples)
      if s.num_draft:
        r.num_computed += len(new) - 1  # accepted drafts: their k/v (computed this step) is valid
        self.stats["draft_tokens"] += s.num_draft
        self.stats["accepted_draft_tokens"] += len(new) - 1
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
                                   lp if r.sampling.logprobs else None))
    return outputs
