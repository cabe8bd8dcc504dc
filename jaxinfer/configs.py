"""Deprecated spellings kept while callers move to jaxinfer.config (the one config mechanism)."""

from jaxinfer.config import ConfigError, from_section, model_section, require  # noqa: F401
from jaxinfer.models.config import ModelConfig


def model_config_from(section, prefix: str = "model") -> ModelConfig:
  return from_section(ModelConfig, section, prefix)
