"""Training test set-up: a shared data cache, the tiny experiment config, one reference run reused by tests."""

import importlib.util
import json
import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def load_experiment(name: str):
  spec = importlib.util.spec_from_file_location(f"experiment_{name}", REPO / "experiments" / f"{name}.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def read_losses(workdir) -> dict[int, float]:
  path = Path(workdir) / "metrics.jsonl"
  return {r["step"]: r["loss"] for r in map(json.loads, path.read_text().splitlines())}


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory):
  return tmp_path_factory.mktemp("jaxinfer_cache")


@pytest.fixture(scope="session")
def tiny_config(cache_dir):
  """tiny_config(workdir, **train_overrides): experiments/tiny.py, quiet, cache in a session directory."""

  def make(workdir, **train):
    config = load_experiment("tiny")
    config.workdir = str(workdir)
    config.data.cache_dir = str(cache_dir)
    config.train.progress = False
    config.train.export_hf = False
    config.train.sample_prompts = ()
    for key, value in train.items():
      setattr(config.train, key, value)
    return config

  return make


@pytest.fixture(scope="session")
def reference_run(tmp_path_factory, tiny_config):
  """12 uninterrupted steps of the tiny experiment, checkpoints every 4 (data parallel over 8 devices)."""
  from jaxinfer.train import train

  workdir = tmp_path_factory.mktemp("reference") / "run"
  result = train(tiny_config(workdir, steps=12, checkpoint_every=4, eval_every=0))
  return workdir, result


@pytest.fixture
def subprocess_env(cache_dir):
  env = dict(os.environ)
  env["PYTHONPATH"] = os.pathsep.join([str(REPO)] + [p for p in [env.get("PYTHONPATH")] if p])
  env["JAXINFER_CACHE_DIR"] = str(cache_dir)
  env["JAX_DEFAULT_MATMUL_PRECISION"] = "highest"  # as tests/conftest.py sets it in this process
  return env


@pytest.fixture(scope="session")
def losses_of():
  return read_losses
