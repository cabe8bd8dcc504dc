"""Shared fixture of the experiment smoke tests: run one experiment through the `jaxinfer run` entry point."""

import json
from pathlib import Path

import pytest

from jaxinfer.cli import main

EXPERIMENTS = Path(__file__).resolve().parents[2] / "experiments"


class Ran:
  def __init__(self, run_dir: Path):
    self.dir = run_dir
    self.records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    self.markdown = (run_dir / "results.md").read_text()
    self.config = json.loads((run_dir / "resolved_config.json").read_text())

  def rows(self, kind):
    return [r for r in self.records if r["kind"] == kind]


@pytest.fixture
def config_path():
  """config_path(name): the absolute path of experiments/<name>.py."""
  return lambda name: str(EXPERIMENTS / f"{name}.py")


@pytest.fixture
def run_experiment(tmp_path):
  """run_experiment(name, *overrides): `jaxinfer run --config experiments/<name>.py --config.smoke=True` into
  tmp_path; returns what it wrote (after checking the run folder's layout)."""

  def run(name, *overrides, smoke=True):
    args = ["jaxinfer", "run", "--config", str(EXPERIMENTS / f"{name}.py"), f"--config.workdir={tmp_path / name}",
            *overrides]
    code = main(args + (["--config.smoke=True"] if smoke else []))
    assert code == 0
    run_dir = tmp_path / name / "default"
    assert not (tmp_path / name / "default.partial").exists()  # renamed into place
    ran = Ran(run_dir)
    assert ran.records[0]["kind"] == "environment" and ran.records[0]["jax"]
    assert ran.config["driver"] and ran.config["workdir"] == str(tmp_path / name)
    return ran

  return run
