"""`jaxinfer bench serve` smoke test: the driver against the test server (smoke sizes), through the shared
results writer; the statistics on hand-made records; the `bench` subcommand's word."""

import json

import pytest

from jaxinfer.serve import bench_metrics
from jaxinfer.serve.loadgen import Record, arrival_gaps


def test_bench_serve_driver(server_url, tmp_path):
  from jaxinfer.experiments import bench_serve
  from jaxinfer.experiments.sections import experiment
  from jaxinfer.config import to_section

  config = experiment("bench_serve", driver="bench_serve",
                      bench=to_section(bench_serve.BenchServeConfig, base_url=server_url, slo_ttft_ms=1e6,
                                       slo_tpot_ms=1e6))
  config.workdir = str(tmp_path / "bench")
  config.smoke = True
  rows = bench_serve.run(config)
  assert [r["rate"] for r in rows] == [float("inf"), 50.0]
  for r in rows:
    assert r["completed"] == 4 and r["failed"] == 0, r["first_error"]
    assert r["total_output_tokens"] >= 4 * 2  # output lengths 2..6 (4 +- 50%), ignore_eos
    assert r["p50_ttft_ms"] > 0 and r["p99_e2e_ms"] >= r["p50_e2e_ms"] > 0
    assert r["goodput"] == pytest.approx(r["request_throughput"])  # generous SLOs: every request meets them
  out = tmp_path / "bench" / "default"
  assert {"metrics.jsonl", "results.md", "latency_vs_rate.png", "resolved_config.json"} <= {p.name for p in out.iterdir()}
  lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
  assert [x["kind"] for x in lines] == ["environment", "rate", "rate"]
  assert "TPOT p99" in (out / "results.md").read_text()


def test_statistics_follow_vllm_definitions():
  a = Record(10, 3, success=True, ttft=0.1, latency=0.5, itl=[0.2, 0.2], output_tokens=3)
  b = Record(20, 1, success=True, ttft=0.3, latency=0.3, itl=[], output_tokens=1)
  c = Record(5, 4, success=False, error="HTTP 429")
  s = bench_metrics.summarize([a, b, c], duration=2.0, slo_ttft_ms=200)
  assert s["completed"] == 2 and s["failed"] == 1 and s["first_error"] == "HTTP 429"
  assert s["request_throughput"] == 1.0 and s["output_throughput"] == 2.0
  assert s["total_token_throughput"] == 17.0
  assert s["mean_tpot_ms"] == pytest.approx(200.0)  # (0.5 - 0.1) / (3 - 1); b has one token: no TPOT
  assert s["mean_ttft_ms"] == pytest.approx(200.0) and s["p50_itl_ms"] == pytest.approx(200.0)
  assert s["goodput"] == 0.5  # only a meets TTFT <= 200 ms


def test_poisson_arrivals():
  gaps = arrival_gaps(4000, rate=5.0, seed=1)
  assert abs(gaps.mean() - 0.2) < 0.02 and (gaps > 0).all()
  assert not arrival_gaps(3, float("inf"), 0).any()


def test_bench_word(monkeypatch):
  from jaxinfer.commands import bench
  from jaxinfer.config import ConfigError

  assert bench.benchmark_name(["jaxinfer", "bench", "serve", "--config", "x.py"]) == "serve"
  with pytest.raises(ConfigError, match="unknown benchmark 'nope'"):
    bench.run({}, argv=["jaxinfer", "bench", "nope", "--config", "x.py"])
