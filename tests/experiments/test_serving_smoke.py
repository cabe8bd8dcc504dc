"""`jaxinfer run --config experiments/serving.py --config.smoke=True`: the three modes over one workload."""

import pytest

from jaxinfer.experiments.serving import SMOKE, ServingExperimentConfig, workload


def test_serving_smoke(run_experiment):
  ran = run_experiment("serving")
  s = ServingExperimentConfig(**SMOKE)
  calibration = ran.rows("calibration")[0]
  assert calibration["decode_step_s"] > 0
  assert calibration["arrival_rate"] == pytest.approx(2.0 * calibration["capacity_req_s"])  # load 2.0
  expected_tokens = sum(o for _, _, o in workload(s, 256, 0, 1.0))  # lengths do not depend on the rate
  rows = ran.rows("serving")
  assert [r["mode"] for r in rows] == ["static", "continuous", "chunked"]
  for r in rows:
    assert r["requests"] == s.num_requests
    assert r["output_tokens"] == expected_tokens
    assert r["throughput_tok_s"] == pytest.approx(r["output_tokens"] / r["makespan_s"])
    assert 0 < r["ttft_p50_ms"] <= r["ttft_p99_ms"]
    assert 0 <= r["tpot_p50_ms"] <= r["tpot_p99_ms"]
    assert r["steps"] > 0 and r["preemptions"] >= 0
    assert r["vs_baseline"] == pytest.approx(r["throughput_tok_s"] / rows[0]["throughput_tok_s"])
  assert rows[0]["vs_baseline"] == 1.0
  # static batching runs each batch in lockstep to its longest request: never fewer steps than requests/batch
  assert rows[0]["steps"] >= -(-s.num_requests // s.max_batch_size)
  line = next(x for x in ran.markdown.splitlines() if x.startswith("| static |"))
  assert line.startswith(f"| static | {rows[0]['throughput_tok_s']:.0f} | 1.00x |")
  assert "| chunked |" in ran.markdown and "16-token step budget" in ran.markdown
  assert (ran.dir / "serving.png").is_file() and (ran.dir / "serving_occupancy.png").is_file()


def test_serving_field_errors_name_the_field(capsys, tmp_path, config_path):
  from jaxinfer.cli import main

  code = main(["jaxinfer", "run", "--config", config_path("serving"), f"--config.workdir={tmp_path}",
               "--config.serving.modes=('static','greedy')"])
  assert code == 2
  assert "serving.modes: choose from" in capsys.readouterr().err
