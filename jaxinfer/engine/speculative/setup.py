"""From `EngineConfig.speculative` to the engine's proposer: one place that knows every method."""

from __future__ import annotations

import dataclasses

from jaxinfer.config.schema import ConfigError
from jaxinfer.engine.speculative.adaptive import AdaptiveLength
from jaxinfer.engine.speculative.ngram import NgramProposer


def _ngram(spec, engine, model, ec):
  return NgramProposer(spec.ngram_max, spec.ngram_min)


def _draft(spec, engine, model, ec):
  from jaxinfer.engine.speculative.draft import DraftProposer, load_draft_model

  draft = load_draft_model(spec.draft_model, model.config)
  # verification at temperature > 0 needs the target's distribution at each draft row
  engine.probs_for = lambda s: s.num_draft > 0 and s.request.sampling.temperature > 0
  return DraftProposer(draft, ec)


def _medusa(spec, engine, model, ec):
  from jaxinfer.engine.speculative.medusa import MedusaProposer, load_heads
  from jaxinfer.engine.step import RowHead

  f = "engine.speculative."
  if getattr(model.config, "sliding_window", None):
    raise ConfigError(f"{f}method: 'medusa' does not run on a sliding-window model (tree attention reads the "
                      f"whole context)")
  if ec.kv_cache_dtype is not None and str(ec.kv_cache_dtype) in ("int8", "float8_e4m3fn"):
    raise ConfigError(f"{f}method: 'medusa' needs a full-precision KV cache (the accepted path's k/v moves "
                      f"between slots; a quantized page's key scales cannot follow), got "
                      f"kv_cache_dtype={ec.kv_cache_dtype!r}")
  heads = load_heads(spec.medusa_heads, model.config)
  k = spec.num_speculative_tokens
  proposer = MedusaProposer(spec.tree or (1,) * k, k, typical=(spec.typical_threshold, spec.typical_alpha)
                            if spec.acceptance == "typical" else None)
  if proposer.depth > heads.num_heads:
    raise ConfigError(f"{f}tree: depth {proposer.depth} needs {proposer.depth} Medusa heads, "
                      f"{spec.medusa_heads!r} has {heads.num_heads}")
  engine.row_head = RowHead(heads, proposer.row_output, ("medusa", proposer.depth, proposer.top_k))
  engine.tree_verification = True
  if spec.acceptance == "typical":
    engine.probs_for = lambda s: s.num_draft > 0 and s.request.sampling.temperature > 0
  return proposer


BUILDERS = {"ngram": _ngram, "draft": _draft, "medusa": _medusa}


def configure(engine, model, ec, proposer):
  """(engine config with max_rows_per_seq >= k + 1, proposer) for ec.speculative; sets engine.probs_for."""
  spec = ec.speculative
  if proposer is not None:
    raise ConfigError("engine.speculative: give either EngineConfig.speculative or Engine(proposer=...), not both")
  k = spec.num_speculative_tokens
  if k + 1 > ec.max_step_tokens:
    raise ConfigError(f"engine.speculative.num_speculative_tokens: k={k} needs k + 1 = {k + 1} rows, more than "
                      f"max_step_tokens={ec.max_step_tokens}")
  ec = dataclasses.replace(ec, max_rows_per_seq=max(ec.max_rows_per_seq, k + 1))
  proposer = BUILDERS[spec.method](spec, engine, model, ec)
  # the cap on drafts is k even when max_rows_per_seq allows more (engines sharing programs across k);
  # adaptive: a sequence's own k moves between min_speculative_tokens and k
  proposer = AdaptiveLength(proposer, k, spec.min_speculative_tokens if spec.adaptive else k)
  return ec, proposer
