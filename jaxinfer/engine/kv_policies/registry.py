"""The KV policies by name: a policy registers its class here from its own file; no if/elif dispatch.

  @register("streaming")
  class StreamingPolicy(EvictionPolicy): ...

make_policy(config, model_config, engine_config) builds the one the config names ("none": None, the engine's
plain PagedLayout)."""

from __future__ import annotations

import importlib

_POLICIES: dict = {}
_BUILTIN = ("streaming", "snapkv", "h2o", "h2o_unscored", "duo",
            "h2o_wide", "duo_masked")  # modules under jaxinfer/engine/kv_policies/


def register(name: str):
  def wrap(cls):
    if name in _POLICIES and _POLICIES[name] is not cls:
      raise ValueError(f"KV policy {name!r} is registered twice ({_POLICIES[name].__name__}, {cls.__name__})")
    _POLICIES[name] = cls
    cls.name = name
    return cls
  return wrap


def _load_builtins() -> None:
  for module in _BUILTIN:
    importlib.import_module(f"jaxinfer.engine.kv_policies.{module}")


def names() -> tuple[str, ...]:
  _load_builtins()
  return ("none",) + tuple(sorted(_POLICIES))


def policy_class(name: str):
  """The class registered under name (None for "none")."""
  if name == "none":
    return None
  _load_builtins()
  return _POLICIES[name]


def make_policy(config, model_config, engine_config):
  if config.name == "none":
    return None
  _load_builtins()
  return _POLICIES[config.name](config, model_config, engine_config)
