"""SpeculativeConfig: which speculative method the engine runs and how; `EngineConfig.speculative`, the config
section `engine.speculative` (errors start with `engine.speculative.<field>: `).

  jaxinfer.SpeculativeConfig(method="draft", num_speculative_tokens=4, draft_model=small_model_or_hf_dir)
  jaxinfer.SpeculativeConfig(method="ngram", num_speculative_tokens=3, ngram_max=3, ngram_min=1)
  jaxinfer.SpeculativeConfig(method="medusa", medusa_heads="results/quickstart/hf", tree=(3, 2),
                             num_speculative_tokens=9)

k = num_speculative_tokens is the most drafts one sequence verifies in a step; the engine then samples up to
k + 1 rows per sequence (it raises EngineConfig.max_rows_per_seq to k + 1). Drafts never exceed what is left
of a request: its max_new_tokens, the context (max_model_len) and the step's token budget clip them.
Medusa: the drafts are the candidate tree's nodes, breadth first (speculative/tree.py), so k caps the nodes a
sequence verifies: a tree with more nodes than k is clipped to its first k (a warning says so), and
tree=() is a chain of the first k heads' top guesses.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from jaxinfer.config.schema import ConfigError, path_field

METHODS = ("draft", "ngram", "medusa")
IMPLEMENTED = ("draft", "ngram", "medusa")
ACCEPTANCE = ("exact", "typical")


def _int(value) -> bool:
  return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


@dataclasses.dataclass(frozen=True)
class SpeculativeConfig:
  SECTION = "speculative"

  method: str = "ngram"  # "draft" (a small draft model), "ngram" (prompt lookup), "medusa" (Medusa-1 heads)
  num_speculative_tokens: int = 4  # k: most drafts per sequence and step
  draft_model: Any = path_field("")  # method "draft": a jaxinfer Transformer or a Hugging Face directory
  medusa_heads: Any = path_field("")  # method "medusa": the heads' directory or file, or a MedusaHeads
  tree: tuple = ()  # method "medusa": top-k per head, e.g. (3, 2), or Medusa's paths ((0,), (1,), (0, 0))
  ngram_max: int = 3  # method "ngram": longest n-gram looked up first ...
  ngram_min: int = 1  # ... down to this one
  adaptive: bool = False  # per-sequence k from its acceptance: +1 after a fully accepted step, -1 otherwise
  min_speculative_tokens: int = 1  # adaptive: the smallest k a sequence drops to
  acceptance: str = "exact"  # medusa: "exact" (lossless) or "typical" (Medusa's typical acceptance)
  typical_threshold: float = 0.09  # typical: epsilon, the hard probability threshold
  typical_alpha: float = 0.3  # typical: delta, the entropy-scaled threshold's factor

  def __post_init__(self):
    f = "engine.speculative."
    if self.method not in METHODS:
      raise ConfigError(f"{f}method: {self.method!r} is not one of {list(METHODS)}")
    if self.method not in IMPLEMENTED:
      raise ConfigError(f"{f}method: {self.method!r} is not available in this build (implemented: "
                        f"{list(IMPLEMENTED)}; see docs/speculative.md)")
    for name in ("num_speculative_tokens", "ngram_max", "ngram_min", "min_speculative_tokens"):
      value = getattr(self, name)
      if not _int(value) or value < 1:
        raise ConfigError(f"{f}{name}: must be a positive integer, got {value!r}")
    if self.ngram_min > self.ngram_max:
      raise ConfigError(f"{f}ngram_min: ngram_min={self.ngram_min} must be <= ngram_max={self.ngram_max}")
    if self.min_speculative_tokens > self.num_speculative_tokens:
      raise ConfigError(f"{f}min_speculative_tokens: {self.min_speculative_tokens} must be <= "
                        f"num_speculative_tokens={self.num_speculative_tokens}")
    if not isinstance(self.adaptive, (bool, np.bool_)):
      raise ConfigError(f"{f}adaptive: must be True or False, got {self.adaptive!r}")
    if self.method == "draft" and (self.draft_model is None or (isinstance(self.draft_model, str)
                                                                and not self.draft_model)):
      raise ConfigError(f"{f}draft_model: method 'draft' needs a draft model (a Transformer or an HF directory)")
    if not isinstance(self.tree, (tuple, list)) or not (
        all(_int(t) and t >= 1 for t in self.tree) or all(isinstance(t, (tuple, list)) for t in self.tree)):
      raise ConfigError(f"{f}tree: must be a tuple of positive top-k counts or of paths, got {self.tree!r}")
    if self.tree and not all(_int(t) for t in self.tree):
      from jaxinfer.engine.speculative.tree import tree_paths

      try:
        tree_paths(self.tree)
      except (ValueError, TypeError) as e:
        raise ConfigError(f"{f}{e}") from None
    if self.method == "medusa":
      if self.medusa_heads is None or (isinstance(self.medusa_heads, str) and not self.medusa_heads):
        raise ConfigError(f"{f}medusa_heads: method 'medusa' needs the heads (the directory `jaxinfer train "
                          f"--config experiments/medusa.py` wrote them to, or a MedusaHeads)")
      if self.adaptive:
        raise ConfigError(f"{f}adaptive: not for method 'medusa' (its candidate tree is static)")
    if self.acceptance not in ACCEPTANCE:
      raise ConfigError(f"{f}acceptance: {self.acceptance!r} is not one of {list(ACCEPTANCE)}")
    if self.acceptance == "typical" and self.method != "medusa":
      raise ConfigError(f"{f}acceptance: 'typical' is Medusa's (method 'medusa'); {self.method!r} verifies "
                        f"exactly or by speculative sampling")
    for name in ("typical_threshold", "typical_alpha"):
      value = getattr(self, name)
      if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0 < value <= 1:
        raise ConfigError(f"{f}{name}: must be in (0, 1], got {value!r}")
