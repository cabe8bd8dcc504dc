"""Which KV policies run with speculative verification, and what they need (EngineConfig's check).

Chain verification (ngram, draft) runs with streaming, snapkv and the h2o family: their evictions wait for
the certainly kept tokens and rejected drafts roll back as the newest slots (base.EvictionPolicy.on_verified;
each policy's file says how). Refused, each with its reason:
  tree verification (medusa): the accepted path's k/v moves between slots after the step (Engine.move_slots),
    which the policies' slot positions and scores do not follow;
  duo, duo_masked: their streaming heads' views (duo: its sinks + window store) have no rollback rule.
"""

from __future__ import annotations

from jaxinfer.config.schema import ConfigError

CHAIN_POLICIES = ("streaming", "snapkv", "h2o", "h2o_wide", "h2o_unscored")
WINDOWED = ("snapkv", "h2o", "h2o_wide", "h2o_unscored")  # rollbacks must stay inside their recent window
REFUSED = {"duo": "its streaming heads' sinks + window store does not roll back rejected drafts"}
TREE_METHODS = ("medusa",)


def check(cfg) -> None:
  """ConfigError unless cfg.kv_policy runs with cfg's speculative verification (speculative set, or
  max_rows_per_seq > 1: up to max_rows_per_seq - 1 drafts per step)."""
  policy, spec = cfg.kv_policy, cfg.speculative
  name = policy.name
  what = "speculative verification (speculative, max_rows_per_seq > 1)"
  if name not in CHAIN_POLICIES:
    reason = REFUSED.get(name, "it has no rule for rolling back rejected drafts")
    raise ConfigError(f"engine.kv_policy.name: kv_policy {name!r} does not run with {what}: {reason}")
  if spec is not None and spec.method in TREE_METHODS:
    raise ConfigError(f"engine.kv_policy.name: kv_policy {name!r} does not run with tree verification "
                      f"(speculative.method={spec.method!r}): the accepted path's k/v moves between slots after "
                      "the step, which the policy's slot positions and scores do not follow")
  k = max(cfg.max_rows_per_seq - 1, spec.num_speculative_tokens if spec is not None else 0)
  if name in WINDOWED and policy.window <= k:
    raise ConfigError(f"engine.kv_policy.window: {name} with up to k={k} drafts per step needs window > k, got "
                      f"window={policy.window} (the recent window every head keeps must cover the drafts a "
                      "rollback may discard)")
