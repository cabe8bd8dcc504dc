"""Static candidate trees (Medusa) and their verification.

A tree is given in the config either as top-k counts per depth, `(3, 2)` = the top 3 guesses of the first head,
each followed by the top 2 of the second (3 + 6 nodes), or as explicit paths in the Medusa project's
"medusa choices" form, `((0,), (1,), (0, 0), (0, 1), (1, 0))`: a path (i_0, .., i_d) is the node taking the
i_0-th guess of head 0, then the i_1-th of head 1, and so on; every prefix of a path must be a path too.
Nodes are kept breadth first, so any prefix of them is a tree again (a step with less room verifies the
first nodes only).

Verification of the rows sampled for a tree (sample 0: the sequence's own last row, sample 1 + i: node i's):
  exact    follow the target's own samples: from the root, go to the child whose token is the sample, stop
           where no child matches; the tokens are exactly what decoding without the tree gives (greedy or
           sampled with the per-position random streams), so the method is lossless;
  typical  Medusa's typical acceptance (sec. 2.3.1): a node is accepted when its token's probability under
           the target at its parent is above min(eps, alpha * exp(-entropy)); the longest accepted path wins,
           then the target's own sample at its end. Not lossless: faster at temperature > 0 (greedy rows use
           exact matching).
"""

from __future__ import annotations

import itertools

import numpy as np


def tree_paths(tree) -> list[tuple[int, ...]]:
  """The config's tree as node paths, breadth first (a ValueError names what is wrong)."""
  tree = tuple(tree)
  if not tree:
    raise ValueError("tree: empty")
  if all(isinstance(t, (int, np.integer)) for t in tree):
    paths = [p for d in range(1, len(tree) + 1) for p in itertools.product(*(range(int(t)) for t in tree[:d]))]
  else:
    paths = [tuple(int(i) for i in p) for p in tree]
    if any(not p or min(p) < 0 for p in paths):
      raise ValueError(f"tree: a path must be a non-empty tuple of guess ranks >= 0, got {tree!r}")
    if len(set(paths)) != len(paths):
      raise ValueError("tree: a path is listed twice")
    known = set(paths)
    missing = next((p for p in paths if len(p) > 1 and p[:-1] not in known), None)
    if missing is not None:
      raise ValueError(f"tree: path {missing} has no parent path {missing[:-1]}")
  return sorted(paths, key=lambda p: (len(p), p))


def tree_parents(paths) -> list[int]:
  """Parent index of each node (-1: a child of the sequence's last token)."""
  index = {p: i for i, p in enumerate(paths)}
  return [index[p[:-1]] if len(p) > 1 else -1 for p in paths]


def _children(parents) -> dict[int, list[int]]:
  children: dict[int, list[int]] = {}
  for i, p in enumerate(parents):
    children.setdefault(p, []).append(i)
  return children


def accept_tree(drafts, parents, samples) -> tuple[list[int], list[int]]:
  """Exact verification: (accepted tokens, the accepted nodes, root to leaf). samples[0] is the root row's
  sample, samples[1 + i] node i's; the tokens end with the sample after the last accepted node."""
  children = _children(parents)
  tokens, path, node = [], [], -1
  while True:
    sample = samples[node + 1]
    tokens.append(sample)
    node = next((c for c in children.get(node, ()) if drafts[c] == sample), None)
    if node is None:
      return tokens, path
    path.append(node)


def typical_accept_tree(drafts, parents, samples, probs, threshold: float, alpha: float
                        ) -> tuple[list[int], list[int]]:
  """Typical acceptance: probs[j] is the target's distribution at sample row j (row 0 the root)."""
  probs = np.asarray(probs, np.float64)
  children = _children(parents)

  def ok(node) -> bool:
    p = probs[parents[node] + 1]
    entropy = -float(np.sum(np.where(p > 0, p * np.log(np.where(p > 0, p, 1.0)), 0.0)))
    return p[drafts[node]] > min(threshold, alpha * np.exp(-entropy))

  def longest(node) -> list[int]:
    best: list[int] = []
    for c in children.get(node, ()):
      if ok(c):
        path = [c] + longest(c)
        if len(path) > len(best):
          best = path
    return best

  path = longest(-1)
  return [drafts[n] for n in path] + [samples[(path[-1] + 1) if path else 0]], path
