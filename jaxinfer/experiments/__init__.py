"""Experiment drivers: `jaxinfer run --config experiments/<name>.py` runs `jaxinfer.experiments.<driver>.run`.

Each driver is one module here, named by the config's top-level `driver` field, exposing `run(config)`; it reads
its own section into a frozen dataclass (validated, errors name the field) and writes its run folder with the
shared writer (`results.py`), timing with the shared helper (`timing.py`). A config with `smoke=True` shrinks
every size so the test suite can run the driver in seconds.
"""

from __future__ import annotations

import importlib
import pkgutil

HELPERS = ("results", "sections", "timing")  # modules of this package that are not drivers


def available() -> list[str]:
  """Names of the drivers in this package."""
  return sorted(m.name for m in pkgutil.iter_modules(__path__) if m.name not in HELPERS and not m.name.startswith("_"))


def driver(name: str):
  """The driver module `name` (its `run(config)` runs an experiment); ConfigError naming `driver` if none."""
  from jaxinfer.config import ConfigError

  if not isinstance(name, str) or name not in available():
    raise ConfigError(f"driver: unknown driver {name!r}; available: {', '.join(available())}")
  module = importlib.import_module(f"{__name__}.{name}")
  if not callable(getattr(module, "run", None)):
    raise ConfigError(f"driver: jaxinfer.experiments.{name} has no run(config)")
  return module
