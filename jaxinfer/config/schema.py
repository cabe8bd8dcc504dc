"""One config mechanism: a frozen dataclass per section, and one generic pair to and from ml-collections.

  section = to_section(TrainConfig, steps=200)          # ConfigDict: every field, overridable on the CLI
  train = from_section(TrainConfig, section, "train")   # validated; errors name `train.<field>`

A section's dataclass validates itself in `__post_init__` and raises ConfigError naming the field as
`--config.<section>.<field>` would. Fields that name files or folders are declared with `path_field()`;
`resolve_paths` turns them into absolute paths against the current directory, once, when a config is loaded
(jaxinfer.config.load.resolve_config_paths), so nothing later depends on where the process was started.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import types
import typing
from pathlib import Path
from typing import Any

from ml_collections import config_dict

PATH = "jaxinfer.path"  # dataclass field metadata key: the field names a file or folder (or a tuple of them)


class ConfigError(ValueError):
  """A config field has an impossible value; the message starts with the field, e.g. `train.steps: ...`."""


def require(condition: bool, field: str, message: str) -> None:
  if not condition:
    raise ConfigError(f"{field}: {message}")


def path_field(default: Any = "", **kwargs) -> Any:
  """A dataclass field naming a path (or a tuple of paths/globs): resolved to absolute when the config loads."""
  if isinstance(default, (list, tuple)):
    return dataclasses.field(default=tuple(default), metadata={PATH: True}, **kwargs)
  return dataclasses.field(default=default, metadata={PATH: True}, **kwargs)


@functools.lru_cache(maxsize=None)
def _hints(cls) -> dict[str, Any]:
  return typing.get_type_hints(cls)


def _base_type(annotation) -> type | None:
  """The type of a field's values for a placeholder: `int | None` -> int, `tuple[str, ...] | None` -> tuple."""
  origin = typing.get_origin(annotation)
  if origin in (typing.Union, types.UnionType):
    for arg in typing.get_args(annotation):
      if arg is not type(None):
        return _base_type(arg)
    return None
  if origin is not None:
    return origin
  return annotation if isinstance(annotation, type) else None


def _is_schema(value) -> bool:
  return dataclasses.is_dataclass(value)


def to_section(schema, **overrides) -> config_dict.ConfigDict:
  """A ConfigDict holding every field of `schema` (a dataclass class or instance), then `overrides`.

  None-valued fields become typed placeholders, so `--config.<section>.<field>=3` still parses; nested
  dataclass fields become nested sections.
  """
  cls = schema if isinstance(schema, type) else type(schema)
  fields = {f.name: f for f in dataclasses.fields(cls)}
  unknown = sorted(set(overrides) - set(fields))
  if unknown:
    raise ConfigError(f"{_section_name(cls)}.{unknown[0]}: unknown field; known fields: {', '.join(fields)}")
  instance = schema if not isinstance(schema, type) else None
  section = config_dict.ConfigDict()
  hints = _hints(cls)
  for name, f in fields.items():
    if name in overrides:
      value = overrides[name]
    elif instance is not None:
      value = getattr(instance, name)
    elif f.default is not dataclasses.MISSING:
      value = f.default
    elif f.default_factory is not dataclasses.MISSING:
      value = f.default_factory()
    else:
      raise ConfigError(f"{_section_name(cls)}.{name}: required field has no value")
    if _is_schema(value):
      value = to_section(value)
    elif value is None:
      value = config_dict.placeholder(_base_type(hints[name]) or object)
    elif isinstance(value, list):
      value = tuple(value)
    setattr(section, name, value)
  return section


def _section_name(cls) -> str:
  return getattr(cls, "SECTION", cls.__name__)


def _to_plain(section) -> dict[str, Any]:
  if isinstance(section, (config_dict.ConfigDict, config_dict.FrozenConfigDict)):
    return section.to_dict()
  return dict(section)


def from_section(cls, section, name: str | None = None):
  """Validated `cls` from a ConfigDict (or mapping, or an instance of cls); errors name `<name>.<field>`."""
  if isinstance(section, cls):
    return section
  name = name or _section_name(cls)
  values = _to_plain(section)
  fields = {f.name: f for f in dataclasses.fields(cls)}
  unknown = sorted(set(values) - set(fields))
  if unknown:
    raise ConfigError(f"{name}.{unknown[0]}: unknown field; known fields: {', '.join(fields)}")
  hints = _hints(cls)
  for key, value in list(values.items()):
    annotation = hints[key]
    nested = _nested_schema(annotation)
    if nested is not None and isinstance(value, dict):
      values[key] = from_section(nested, value, f"{name}.{key}")
    elif isinstance(value, list):
      values[key] = tuple(value)
  own = _section_name(cls)
  try:
    return cls(**values)
  except ConfigError as e:
    message = str(e)
    if own != name and message.startswith(own + "."):
      message = name + message[len(own):]
    raise ConfigError(message) from None
  except TypeError as e:
    raise ConfigError(f"{name}: {e}") from None


def _nested_schema(annotation):
  base = _base_type(annotation)
  return base if isinstance(base, type) and dataclasses.is_dataclass(base) else None


def resolve_paths(cls, section, field_prefix: str, base: str | os.PathLike | None = None) -> list[str]:
  """Make every path field of `section` (a ConfigDict of schema `cls`) absolute, in place; returns the fields
  changed. Empty strings mean "not set" and stay empty; absolute paths are left as they are."""
  base = Path(base if base is not None else os.getcwd())
  changed = []
  hints = _hints(cls)
  for f in dataclasses.fields(cls):
    if f.name not in section:
      continue
    value = section[f.name]
    nested = _nested_schema(hints[f.name])
    if nested is not None and isinstance(value, config_dict.ConfigDict):
      changed += resolve_paths(nested, value, f"{field_prefix}.{f.name}", base)
      continue
    if not f.metadata.get(PATH):
      continue
    resolved = _absolute(value, base)
    if resolved != value:
      section[f.name] = resolved
      changed.append(f"{field_prefix}.{f.name}")
  return changed


def _absolute(value, base: Path):
  if isinstance(value, (tuple, list)):
    return tuple(_absolute(v, base) for v in value)
  if not value or not isinstance(value, (str, os.PathLike)):
    return value
  path = Path(os.path.expanduser(os.fspath(value)))
  return os.path.normpath(os.fspath(path if path.is_absolute() else (base / path)))
