"""jaxinfer's config mechanism: frozen dataclass sections, to and from ml-collections, paths made absolute.

Experiments build their sections with the `*_section` helpers below (every field present, so any of them can
be overridden as `--config.<section>.<field>=...`); commands turn them back into validated dataclasses with
`from_section`.
"""

from jaxinfer.config.load import SECTIONS, resolve_config_paths, schema_of
from jaxinfer.config.schema import ConfigError, from_section, path_field, require, resolve_paths, to_section


def section(name: str, **overrides):
  """The ConfigDict of section `name` (a key of SECTIONS): the schema's defaults, then overrides."""
  return to_section(schema_of(name), **overrides)


def model_section(**overrides):
  return section("model", **overrides)


def data_section(**overrides):
  return section("data", **overrides)


def train_section(**overrides):
  return section("train", **overrides)


def mesh_section(**overrides):
  return section("mesh", **overrides)


def generate_section(**overrides):
  return section("generate", **overrides)


def engine_section(**overrides):
  return section("engine", **overrides)


__all__ = ["ConfigError", "SECTIONS", "data_section", "engine_section", "from_section", "generate_section",
           "mesh_section", "model_section", "path_field", "require", "resolve_config_paths", "resolve_paths",
           "schema_of", "section", "to_section", "train_section"]
