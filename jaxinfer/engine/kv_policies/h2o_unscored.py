"""H2O with its attention-mass scoring switched off: an ablation that isolates the scoring's cost.

Everything else is H2O's (h2o.py): the same page-table width (the whole prompt's pages), the same masked jnp
attention pass, the same compaction at the end of prefill, the same eviction program every decode step and
the same periodic compaction; only MaskRule.scores is False, so the pass neither computes nor accumulates the
per-slot mass. With every score 0 the selections fall back to position order (top-k and argmin pick the
lowest index on ties): the prompt keeps its first budget - window slots plus the window, and each decode step
evicts the oldest slot outside the window. Its outputs are therefore NOT H2O's; its time is. Timing h2o
against h2o_unscored in the same run gives the scoring's own cost (experiments/kv_compression.py).
"""

from __future__ import annotations

from jaxinfer.engine.kv_policies.attention import MaskRule
from jaxinfer.engine.kv_policies.h2o import H2OPolicy
from jaxinfer.engine.kv_policies.registry import register


@register("h2o_unscored")
class H2OUnscoredPolicy(H2OPolicy):
  rule = MaskRule(scores=False)
