"""The speculative seam: a Proposer suggests draft tokens, the engine step verifies them in one pass.

A decode with drafts d_1..d_k runs k + 1 rows (its newest token, then the drafts) and samples every one of
them; the sample at row i is what the model itself would put at that position, drawn with that position's
own random stream (fold_in(seed, position)). Verification by exact match (`accept`) is therefore lossless for
any proposer, greedy or sampled: the output is token for token what decoding without drafts gives. A proposer
that also reports its draft distributions (`draft_probs`, the draft model) is verified at temperature > 0 by
speculative sampling instead (speculative/sampling.py: accept with min(1, p/q), else resample from
norm(max(p - q, 0))), which accepts more often and is lossless in distribution. The k/v of rejected drafts is
overwritten later; their pages are given back (Scheduler.trim); they are never named in the prefix cache.

Optional hooks a Proposer may define (the engine calls them when present):
  prepare(requests, rooms, live_ids)  before a schedule: draft for all decodes at once (a batched draft model)
  observe(request, num_draft, num_accepted)  after verification (adaptive k, acceptance statistics)
  draft_probs(request) -> [k, vocab] or None  the distribution each proposed token was drawn from
"""

from __future__ import annotations


def accept(drafts, samples) -> list[int]:
  """samples[i] is the model's token after drafts[:i]; returns the accepted tokens (at least one)."""
  out = []
  for i, sample in enumerate(samples):
    out.append(sample)
    if i >= len(drafts) or drafts[i] != sample:
      break
  return out


class Proposer:
  """Interface: draft tokens to follow a request's known tokens (at most max_tokens of them)."""

  def propose(self, request, max_tokens: int) -> list[int]:
    raise NotImplementedError
