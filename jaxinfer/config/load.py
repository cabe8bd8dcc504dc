"""Which dataclass describes which config section, and what happens once when a config is loaded.

A config is an ml_collections ConfigDict with top-level fields (name, seed, workdir, driver, ...) and sections
(model, data, train, mesh, generate, engine, ...). `SECTIONS` names each section's schema (imported lazily,
so this module imports nothing heavy); `resolve_config_paths` makes every path the config names absolute
against the current directory. The CLI calls it right after parsing flags; `train()` and the experiment
drivers call it again, which is a no-op on an absolute config.
"""

from __future__ import annotations

import importlib
import os

from jaxinfer.config.schema import _absolute, resolve_paths

# section name -> "module:Class"; a section missing from a config is simply not resolved
SECTIONS = {
    "model": "jaxinfer.models.config:ModelConfig",
    "data": "jaxinfer.data.dataset:DataConfig",
    "train": "jaxinfer.train.config:TrainConfig",
    "mesh": "parallel.mesh:MeshConfig",
    "generate": "jaxinfer.generation.config:GenerateConfig",
    "engine": "jaxinfer.engine.config:EngineConfig",
    "serve": "jaxinfer.serve.config:ServeConfig",
}
TOP_LEVEL_PATHS = ("workdir",)


def schema_of(section: str):
  module, name = SECTIONS[section].split(":")
  return getattr(importlib.import_module(module), name)


def driver_sections(config) -> dict[str, type]:
  """The sections an experiment's driver declares: every dataclass with a SECTION in the driver's module
  (jaxinfer.experiments.<config.driver>), so a driver's own path fields are resolved like the shared ones."""
  name = config.get("driver") if hasattr(config, "get") else None
  if not isinstance(name, str) or not name:
    return {}
  try:
    module = importlib.import_module(f"jaxinfer.experiments.{name}")
  except ImportError:
    return {}  # an unknown driver is reported, naming the field, when the driver is looked up
  import dataclasses

  return {cls.SECTION: cls for cls in vars(module).values()
          if isinstance(cls, type) and dataclasses.is_dataclass(cls) and isinstance(getattr(cls, "SECTION", None), str)}


def resolve_config_paths(config, base: str | os.PathLike | None = None) -> list[str]:
  """Absolute paths for workdir and every path field of every known section (the shared ones in SECTIONS and
  the driver's own), in place; returns the fields changed."""
  from pathlib import Path

  base = Path(base if base is not None else os.getcwd())
  changed = []
  for key in TOP_LEVEL_PATHS:
    if key in config:
      resolved = _absolute(config[key], base)
      if resolved != config[key]:
        config[key] = resolved
        changed.append(key)
  schemas = {section: schema_of(section) for section in SECTIONS if section in config}
  schemas.update(driver_sections(config))
  for section, cls in schemas.items():
    if section in config and config[section] is not None and hasattr(config[section], "keys"):
      changed += resolve_paths(cls, config[section], section, base)
  return changed
