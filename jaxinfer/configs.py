"""Experiment configs: ml_collections.ConfigDict sections shared by experiments, and their validation.

Every experiment module in experiments/ has get_config() returning a ConfigDict with a `model` section
(the fields of ModelConfig) plus the sections its command reads. Configs are validated before anything
compiles; errors name the field as `--config.<section>.<field>` would.
"""

from __future__ import annotations

import dataclasses

from ml_collections import config_dict

from jaxinfer.config import ConfigError
from jaxinfer.models.config import ModelConfig

_OPTIONAL_TYPES = {"head_dim": int, "sliding_window": int, "attention_impl": str, "bos_token_id": int,
                   "eos_token_id": int, "layer_types": tuple}


def model_section(**overrides) -> config_dict.ConfigDict:
  """A `model` ConfigDict holding every ModelConfig field (defaults, then overrides)."""
  fields = {f.name: f.default for f in dataclasses.fields(ModelConfig)}
  unknown = set(overrides) - set(fields)
  if unknown:
    raise ConfigError(f"model.{sorted(unknown)[0]}: not a ModelConfig field")
  fields.update(overrides)
  section = config_dict.ConfigDict()
  for name, value in fields.items():
    # None fields become typed placeholders so that --config.model.head_dim=128 can still be parsed
    setattr(section, name, config_dict.placeholder(_OPTIONAL_TYPES[name]) if value is None else value)
  return section


def model_config_from(section: config_dict.ConfigDict, prefix: str = "model") -> ModelConfig:
  """ModelConfig from a `model` section; an unknown key or a bad value raises ConfigError naming the field."""
  values = section.to_dict() if hasattr(section, "to_dict") else dict(section)
  known = {f.name for f in dataclasses.fields(ModelConfig)}
  unknown = sorted(set(values) - known)
  if unknown:
    raise ConfigError(f"{prefix}.{unknown[0]}: unknown field; known fields: {', '.join(sorted(known))}")
  if isinstance(values.get("layer_types"), list):
    values["layer_types"] = tuple(values["layer_types"])
  try:
    return ModelConfig(**values)
  except ConfigError as e:
    raise ConfigError(str(e).replace("model.", f"{prefix}.", 1)) from None
  except TypeError as e:
    raise ConfigError(f"{prefix}: {e}") from None


def require(condition: bool, field: str, message: str) -> None:
  if not condition:
    raise ConfigError(f"{field}: {message}")
