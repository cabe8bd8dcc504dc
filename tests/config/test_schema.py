"""The config mechanism: dataclass sections to and from ml-collections, validation naming the field, and
paths made absolute once when a config is loaded."""

import dataclasses
import os

import pytest
from ml_collections import config_dict

from jaxinfer.config import (ConfigError, engine_section, from_section, generate_section, path_field,
                             resolve_config_paths, to_section, train_section)
from jaxinfer.data.dataset import DataConfig
from jaxinfer.engine.config import EngineConfig
from jaxinfer.train.config import TrainConfig


@dataclasses.dataclass(frozen=True)
class Inner:
  SECTION = "inner"
  depth: int = 2
  file: str = path_field("")


@dataclasses.dataclass(frozen=True)
class Outer:
  SECTION = "outer"
  size: int = 4
  limit: int | None = None
  names: tuple[str, ...] = ("a", "b")
  inner: Inner = dataclasses.field(default_factory=Inner)
  files: tuple[str, ...] = path_field(())

  def __post_init__(self):
    if self.size < 1:
      raise ConfigError(f"outer.size: must be >= 1, got {self.size}")


def test_round_trip_placeholders_lists_and_nested_sections():
  section = to_section(Outer, size=7)
  assert section.size == 7 and section.inner.depth == 2
  section.limit = 3  # a None default is a typed placeholder: it can still be set (as --config.outer.limit=3)
  with pytest.raises(TypeError):
    section.limit = "three"
  section.names = ["x", "y"]  # a list from the command line becomes the field's tuple
  value = from_section(Outer, section, "outer")
  assert value == Outer(size=7, limit=3, names=("x", "y"), inner=Inner())
  assert from_section(Outer, to_section(value)) == value


def test_errors_name_the_field_under_the_name_it_is_read_as():
  with pytest.raises(ConfigError, match=r"^outer\.sise: unknown field"):
    to_section(Outer, sise=3)
  bad = to_section(Outer)
  with bad.unlocked():
    bad.colour = "red"
  with pytest.raises(ConfigError, match=r"^draft\.colour: unknown field"):
    from_section(Outer, bad, "draft")
  with pytest.raises(ConfigError, match=r"^draft\.size: must be >= 1, got 0"):
    from_section(Outer, dict(to_section(Outer).to_dict(), size=0), "draft")
  with pytest.raises(ConfigError, match=r"^train\.grad_accum: .*not divisible"):
    from_section(TrainConfig, train_section(batch_size=6, grad_accum=4))
  with pytest.raises(ConfigError, match=r"^engine\."):
    from_section(EngineConfig, dict(engine_section().to_dict(), page_size=0))


def test_paths_are_resolved_once_against_the_current_directory(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  config = config_dict.ConfigDict()
  config.workdir = "results/x"
  config.data = to_section(DataConfig, paths=("src", "/abs/file.txt", "docs/*.md"), tokenizer="tok.json")
  config.generate = generate_section(checkpoint="")
  changed = resolve_config_paths(config)
  assert config.workdir == str(tmp_path / "results" / "x")
  assert config.data.paths == (str(tmp_path / "src"), "/abs/file.txt", str(tmp_path / "docs" / "*.md"))
  assert config.data.tokenizer == str(tmp_path / "tok.json")
  assert config.data.cache_dir == "" and config.generate.checkpoint == ""  # unset stays unset
  assert set(changed) == {"workdir", "data.paths", "data.tokenizer"}
  monkeypatch.chdir(tmp_path / "..")
  assert resolve_config_paths(config) == []  # absolute now: a second call changes nothing
  assert config.workdir == str(tmp_path / "results" / "x")


def test_a_drivers_own_sections_are_resolved(tmp_path, monkeypatch):
  from jaxinfer.experiments.bench_serve import BenchServeConfig

  monkeypatch.chdir(tmp_path)
  config = config_dict.ConfigDict()
  config.driver = "bench_serve"
  config.bench = to_section(BenchServeConfig, checkpoint="ckpt/hf")
  resolve_config_paths(config)
  assert config.bench.checkpoint == os.path.join(str(tmp_path), "ckpt", "hf")
