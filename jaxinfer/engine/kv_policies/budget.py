"""engine.kv_cache_bytes under a KV policy whose pages are not the plain layout's (duo: retrieval heads only).

A policy class with a `pages_for_budget(engine_config, model_config)` classmethod sizes the pool itself; for
every other policy the budget is left to EngineConfig.resolve (config.pages_for_budget)."""

from __future__ import annotations

import dataclasses

from jaxinfer.engine.kv_policies.registry import policy_class


def policy_budget(engine_config, model_config):
  """engine_config with num_pages from kv_cache_bytes as the policy counts a page (unchanged otherwise)."""
  if engine_config.kv_cache_bytes is None:
    return engine_config
  size = getattr(policy_class(engine_config.kv_policy.name), "pages_for_budget", None)
  if size is None:
    return engine_config
  return dataclasses.replace(engine_config, num_pages=size(engine_config, model_config), kv_cache_bytes=None)
