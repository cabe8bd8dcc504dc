"""Speculative sampling (Leviathan et al. 2023; Chen et al. 2023), verified on the host.

Draft token x_i was drawn from the draft's distribution q_i; the target's distribution at that position is
p_i (both after the request's temperature / top-k / top-p / min-p). x_i is accepted with probability
min(1, p_i(x_i) / q_i(x_i)); at the first rejection a token is drawn from norm(max(p_i - q_i, 0)) and the rest
is dropped; when all k are accepted the target's own sample at the row after the last draft is the bonus
token. Every accepted-or-resampled token is then distributed exactly as p_i: the output has the target's
distribution whatever the draft is.

Randomness: one NumPy stream per (request seed, position, tag), so a request's draws do not depend on the batch
it ran in, and are independent of the draft's own draws (another seed) and of the target's device sample.
"""

from __future__ import annotations

import numpy as np

_TAG = 0x5EC5A


def speculative_accept(drafts, q, p, bonus: int, seed: int, first_position: int) -> list[int]:
  """drafts [k] tokens; q [k, vocab] the draft distributions they were drawn from; p [k (+ 1), vocab] the
  target's distributions at the same positions; bonus: the target's sample after the last draft; the draft
  i sits at position first_position + i. Returns the accepted tokens plus one resampled or bonus token."""
  out = []
  for i, x in enumerate(drafts):
    rng = np.random.default_rng([int(seed), int(first_position) + i, _TAG])
    pi, qi = np.asarray(p[i], np.float64), np.asarray(q[i], np.float64)
    if rng.random() * qi[x] < pi[x]:  # u < p/q without dividing (q(x) > 0: x was drawn from q)
      out.append(int(x))
      continue
    residual = np.maximum(pi - qi, 0.0)
    total = residual.sum()
    if not total > 0:  # p == q up to rounding: a rejection then has probability ~0; fall back to p itself
      residual, total = pi, pi.sum()
    out.append(int(rng.choice(residual.shape[0], p=residual / total)))
    return out
  out.append(int(bonus))
  return out
