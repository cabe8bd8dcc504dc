"""Prompt-lookup decoding (n-gram drafting): no draft model; the continuation of the latest earlier occurrence
of the context's last n tokens is proposed, trying the longest n first (max_n down to min_n)."""

from __future__ import annotations

from jaxinfer.engine.speculative.base import Proposer


class NgramProposer(Proposer):
  def __init__(self, n: int = 3, min_n: int | None = None):
    min_n = n if min_n is None else min_n
    if min_n < 1 or n < min_n:
      raise ValueError(f"NgramProposer: need 1 <= min_n <= n, got min_n={min_n}, n={n}")
    self.n, self.min_n = n, min_n

  def propose(self, request, max_tokens: int) -> list[int]:
    tokens = request.prompt + request.output
    for n in range(self.n, self.min_n - 1, -1):
      if len(tokens) <= n:
        continue
      tail = tokens[-n:]
      for start in range(len(tokens) - n - 1, -1, -1):
        if tokens[start:start + n] == tail:
          return tokens[start + n:start + n + max_tokens]
    return []
