"""H2O without its narrow decode program: an ablation that isolates what reading only the budget's pages gains.

Everything is H2O's (h2o.py: scoring, compaction, eviction, outputs identical) except decode_table_pages,
which is None: every step, decode included, reads the full page-table width (the whole prompt's pages) as
H2O did before the narrow program existed. Timing h2o against h2o_wide in the same run gives the gain
(experiments/kv_compression.py); the tests check that the two give the same tokens and log-probabilities.
"""

from __future__ import annotations

from jaxinfer.engine.kv_policies.h2o import H2OPolicy
from jaxinfer.engine.kv_policies.registry import register


@register("h2o_wide")
class H2OWidePolicy(H2OPolicy):
  def decode_table_pages(self, pages_per_seq: int) -> int | None:
    return None
