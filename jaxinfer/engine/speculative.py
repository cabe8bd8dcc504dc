"""Speculative decoding seam: a Proposer suggests draft tokens, the engine step verifies them in one pass.

A decode with drafts d_1..d_k runs k + 1 rows (its newest token, then the drafts) and samples every one of
them; the sample at row i is what the model itself would put at that position, drawn with that position's
own random stream (fold_in(seed, position)), so verification by exact match is lossless: the output is
token for token what decoding without drafts gives, greedy or sampled. `accept` keeps the drafts the samples
confirm and then the first sample that differs (or the bonus sample after the last draft). The k/v of
rejected drafts is simply overwritten later; their pages are given back (Scheduler.trim); they are never
named in the prefix cache (only tokens in a request's output are).

A speculative method is a Proposer in its own file: `propose(request, max_tokens) -> list[int]` sees the
request's known tokens (`request.prompt`, `request.output`). Heads that read the model's hidden states
(Medusa, EAGLE) use the model seam `model(..., return_hidden=True)` / `model.logits(hidden)`.
Enable with `Engine(model, config, proposer=...)` and `EngineConfig.max_rows_per_seq = k + 1`.
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


class NgramProposer(Proposer):
  """Prompt-lookup decoding: find the latest earlier occurrence of the last `n` tokens and propose what
  followed it."""

  def __init__(self, n: int = 3):
    if n < 1:
      raise ValueError(f"NgramProposer: n must be >= 1, got {n}")
    self.n = n

  def propose(self, request, max_tokens: int) -> list[int]:
    tokens = request.prompt + request.output
    n = self.n
    if len(tokens) <= n:
      return []
    tail = tokens[-n:]
    for start in range(len(tokens) - n - 1, -1, -1):
      if tokens[start:start + n] == tail:
        return tokens[start + n:start + n + max_tokens]
    return []
