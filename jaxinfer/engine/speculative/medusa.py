"""Medusa-1 in the engine: the heads run inside every engine step on the sampled rows' hidden states and
return their top guesses (step.RowHead); the proposer turns the guesses made at a request's newest token into
the static candidate tree (speculative/tree.py), which the next step verifies in one target forward with tree
attention (jaxinfer/engine/tree_attention.py; BatchBuilder gives every node the position after its parent and
a slot of its own). The accepted path's k/v is then moved to its positions (ModelRunner.move_slots).

Head k, read at the row of token x_p, guesses x_{p+k+2}; the row's own sample is x_{p+1}, the request's
newest token, so the tree's first level comes from head 0.
"""

from __future__ import annotations

import logging

import jax
import numpy as np

from jaxinfer.config.schema import ConfigError
from jaxinfer.engine.speculative.base import Proposer
from jaxinfer.engine.speculative.tree import tree_parents, tree_paths

log = logging.getLogger("jaxinfer.engine")


def load_heads(heads, model_config):
  """A MedusaHeads as it is, or read from its directory / file (errors name engine.speculative.medusa_heads)."""
  from jaxinfer.models.medusa import MedusaHeads, load_medusa_heads

  f = "engine.speculative.medusa_heads: "
  if isinstance(heads, MedusaHeads):
    for name in ("hidden_size", "vocab_size"):
      if getattr(heads.config, name) != getattr(model_config, name):
        raise ConfigError(f"{f}the heads have {name}={getattr(heads.config, name)}, the model "
                          f"{getattr(model_config, name)}")
    return heads
  try:
    return load_medusa_heads(heads, model_config)
  except (OSError, ValueError) as e:
    raise ConfigError(f"{f}{e}") from None


class MedusaProposer(Proposer):
  """tree: the config's tree; k: the most nodes a step verifies (more are clipped, breadth first); typical:
  (threshold, alpha) for typical acceptance, None for exact verification."""

  def __init__(self, tree, k: int | None = None, typical=None):
    self.paths = tree_paths(tree)
    if k is not None and len(self.paths) > k:
      log.warning("medusa: the candidate tree has %d nodes, num_speculative_tokens=%d verifies the first %d "
                  "(breadth first)", len(self.paths), k, k)
      self.paths = self.paths[:k]
    self.typical = typical
    self.parents = tree_parents(self.paths)
    self.depth = max(len(p) for p in self.paths)
    self.top_k = max(max(p) for p in self.paths) + 1
    self._depths = np.asarray([len(p) - 1 for p in self.paths])
    self._ranks = np.asarray([p[-1] for p in self.paths])
    self.guesses: dict[int, tuple[int, np.ndarray]] = {}  # request id -> (its tokens then, [depth, top_k])

  def row_output(self, heads, hidden):
    """In the step: the heads' top_k guesses at every sampled row, [R, depth, top_k] int32."""
    return jax.lax.top_k(heads(hidden, self.depth), self.top_k)[1].astype(np.int32)

  def observe_head(self, request, guesses) -> None:
    """The guesses made at the row that sampled the request's newest token."""
    self.guesses[request.request_id] = (request.num_tokens, np.asarray(guesses))

  def prepare(self, requests, rooms, live_ids) -> None:
    self.guesses = {i: g for i, g in self.guesses.items() if i in live_ids}

  def propose(self, request, max_tokens: int) -> list[int]:
    known = self.guesses.get(request.request_id)
    if known is None or known[0] != request.num_tokens:  # none yet, or made before a rollback
      return []
    n = min(max_tokens, len(self.paths))
    return known[1][self._depths[:n], self._ranks[:n]].tolist()

  def draft_parents(self, request) -> list[int]:
    return self.parents
