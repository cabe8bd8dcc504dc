"""The shared results writer: results/<experiment>/<run>/ written under a temporary name, then renamed."""

import json

import pytest
from ml_collections import config_dict

from jaxinfer.config import ConfigError
from jaxinfer.experiments import results
from jaxinfer.experiments.sections import experiment


def config_for(tmp_path, **top):
  c = experiment("demo", driver="serving", section_a=config_dict.ConfigDict(dict(x=3)))
  c.workdir = str(tmp_path / "demo")
  for k, v in top.items():
    c[k] = v
  return c


def test_run_folder_layout(tmp_path):
  c = config_for(tmp_path, run_name="r1")
  plt = results.pyplot()
  with results.open_run(c) as run:
    assert run.dir == tmp_path / "demo" / "r1.partial"
    run.log("part", n=1, value=0.5)
    run.section("A table", "intro", results.table_from([dict(a=1, b=2.345)], (("a", "a", None), ("b", "b", ".1f"))))
    fig, ax = plt.subplots()
    ax.plot([1, 2], [3, 4])
    run.figure(fig, "p.png")
  final = tmp_path / "demo" / "r1"
  assert run.dir == final and not (tmp_path / "demo" / "r1.partial").exists()
  assert sorted(p.name for p in final.iterdir()) == ["metrics.jsonl", "p.png", "resolved_config.json", "results.md"]
  records = [json.loads(x) for x in (final / "metrics.jsonl").read_text().splitlines()]
  assert records[0]["kind"] == "environment" and records[1] == dict(kind="part", n=1, value=0.5)
  md = (final / "results.md").read_text()
  assert md.startswith("# demo\n\nMeasured ") and "## A table\n\nintro\n\n| a | b |\n|---|---|\n| 1 | 2.3 |" in md
  assert json.loads((final / "resolved_config.json").read_text())["section_a"] == {"x": 3}


def test_a_failed_run_keeps_the_previous_one(tmp_path):
  c = config_for(tmp_path)
  with results.open_run(c) as run:
    run.log("part", n=1)
  with pytest.raises(RuntimeError):
    with results.open_run(c) as run:
      run.log("part", n=2)
      raise RuntimeError("driver failed")
  kept = (tmp_path / "demo" / "default" / "metrics.jsonl").read_text()
  assert '"n": 1' in kept and '"n": 2' not in kept
  assert '"n": 2' in (tmp_path / "demo" / "default.partial" / "metrics.jsonl").read_text()  # for inspection
  with results.open_run(c) as run:  # a rerun replaces both
    run.log("part", n=3)
  assert sorted(p.name for p in (tmp_path / "demo").iterdir()) == ["default"]


def test_bad_run_name_is_named(tmp_path):
  with pytest.raises(ConfigError, match="run_name: must be a plain folder name"):
    results.run_dir(config_for(tmp_path, run_name="../x"))


def test_metrics_log_resume_drops_later_steps(tmp_path):
  path = tmp_path / "metrics.jsonl"
  log = results.MetricsLog(path)
  for step in range(1, 6):
    log.write(dict(step=step, loss=1.0 / step))
  log.close()
  path.write_text(path.read_text() + '{"step": 6, "lo')  # a line cut by a kill
  assert [r["step"] for r in results.read_metrics(path)] == [1, 2, 3, 4, 5]
  log = results.MetricsLog(path, resume_step=3)
  log.write(dict(step=4, loss=0.0))
  log.close()
  assert [r["step"] for r in results.read_metrics(path)] == [1, 2, 3, 4]


def test_fmt():
  assert results.fmt(None) == "-" and results.fmt(1.23456) == "1.235" and results.fmt(2.5, "{:.2f}x") == "2.50x"
  assert results.fmt(float("nan")) == "nan" and results.fmt(123456.0) == "1.235e+05"
