"""Config-schema helpers for experiments: the top-level fields every experiment config has, and reading a
driver's own section back as its validated dataclass (with the driver's smoke sizes when `smoke=True`).

  def get_config():                                            # experiments/<name>.py
    return experiment("serving", driver="serving", model=model_section(...), serving=to_section(ServingConfig))

  cfg = read(config, ServingConfig, smoke=SMOKE)               # jaxinfer/experiments/serving.py
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

from ml_collections import config_dict

from jaxinfer.config import ConfigError, from_section, require

def experiment(name: str, driver: str, seed: int = 0, **sections) -> config_dict.ConfigDict:
  """An experiment config: name, driver, seed, workdir results/<name>, run_name "default", smoke off, sections."""
  c = config_dict.ConfigDict()
  c.name = name
  c.driver = driver  # jaxinfer.experiments.<driver>.run(config) runs it (`jaxinfer run`)
  c.seed = seed
  c.workdir = f"results/{name}"  # the experiment's folder; a run writes <workdir>/<run_name>/
  c.run_name = "default"
  c.smoke = False  # True: the driver's tiny sizes (the test suite runs every experiment this way)
  for key, value in sections.items():
    setattr(c, key, value)
  return c


def read(config, cls, smoke: Mapping[str, Any] | None = None, name: str | None = None):
  """`config[<section>]` as a validated `cls`; when `config.smoke`, with the `smoke` overrides on top (they win
  over command-line overrides of the same fields: smoke sizes are the driver's, for the test suite)."""
  name = name or cls.SECTION
  require(name in config, name, f"missing section: the {config.get('driver', '?')} driver reads it")
  value = from_section(cls, config[name], name)
  if config.get("smoke") and smoke:
    value = replace(value, name, **smoke)
  return value


def replace(value, name: str, **changes):
  """dataclasses.replace that validates again and names the section in its errors."""
  fields = {f.name for f in dataclasses.fields(value)}
  unknown = sorted(set(changes) - fields)
  if unknown:
    raise ConfigError(f"{name}.{unknown[0]}: unknown field")
  try:
    return dataclasses.replace(value, **changes)
  except ConfigError as e:
    own = getattr(type(value), "SECTION", name)
    message = str(e)
    raise ConfigError(name + message[len(own):] if message.startswith(own + ".") else message) from None


def check(cls_or_name, field: str, condition: bool, message: str) -> None:
  """`require` with the section name taken from a dataclass (its SECTION) or given."""
  name = cls_or_name if isinstance(cls_or_name, str) else cls_or_name.SECTION
  require(condition, f"{name}.{field}", message)
