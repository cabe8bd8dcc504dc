"""`jaxinfer run --config experiments/prefix_sharing.py --config.smoke=True`, one part per test (each part's
section has `enabled`): attention only, engine decode, time to first token."""

import pytest

from jaxinfer.experiments.prefix_sharing import SMOKE

PARTS = ("attention", "engine_decode", "ttft")


def run_part(run_experiment, part):
  ran = run_experiment("prefix_sharing", *(f"--config.{p}.enabled=False" for p in PARTS if p != part))
  assert {r["kind"] for r in ran.records} == {"environment", part}  # the other parts did not run
  return ran


def test_attention_part(run_experiment):
  ran = run_part(run_experiment, "attention")
  rows = ran.rows("attention")
  assert [r["prefix_len"] for r in rows] == list(SMOKE["attention"]["prefix_lens"])
  for r in rows:
    assert r["baseline_tok_s"] > 0 and r["hydragen_tok_s"] > 0
    assert r["speedup"] == pytest.approx(r["hydragen_tok_s"] / r["baseline_tok_s"])
  first = rows[0]
  assert (f"| {first['prefix_len']} | {first['baseline_tok_s']:.1f} | {first['hydragen_tok_s']:.1f} | "
          f"{first['speedup']:.2f}x |") in ran.markdown
  assert "## Attention only" in ran.markdown and "## Engine decode" not in ran.markdown
  assert (ran.dir / "throughput.png").is_file() and not (ran.dir / "ttft.png").exists()


def test_engine_decode_part(run_experiment):
  ran = run_part(run_experiment, "engine_decode")
  e = SMOKE["engine_decode"]
  rows = ran.rows("engine_decode")
  assert [r["prefix_len"] for r in rows] == list(e["prefix_lens"])
  for r in rows:
    assert r["baseline_tok_s"] > 0 and r["hydragen_tok_s"] > 0 and r["prefill_s"] > 0
    assert r["speedup"] == pytest.approx(r["hydragen_tok_s"] / r["baseline_tok_s"])
    assert f"| {r['prefix_len']} | {r['baseline_tok_s']:.0f} | {r['hydragen_tok_s']:.0f} |" in ran.markdown
  assert f"batch {e['batch']} requests" in ran.markdown
  assert (ran.dir / "engine_throughput.png").is_file()


def test_ttft_part(run_experiment):
  ran = run_part(run_experiment, "ttft")
  t = SMOKE["ttft"]
  rows = ran.rows("ttft")
  assert [r["shared_len"] for r in rows] == list(t["shared_lens"])
  for r in rows:
    # later sequential requests found the shared context cached: at least its whole pages
    assert r["hit_tokens"] >= (t["requests"] - 1) * (r["shared_len"] // 16) * 16
    assert r["seq_rest_speedup"] == pytest.approx(r["seq_nocache_rest_ms"] / r["seq_cache_rest_ms"])
    assert r["burst_speedup"] == pytest.approx(r["burst_nocache_mean_ms"] / r["burst_cache_mean_ms"])
    assert min(v for k, v in r.items() if k.endswith("_ms")) > 0
  assert "## Time to first token" in ran.markdown and (ran.dir / "ttft.png").is_file()


def test_all_parts_off_is_an_error(capsys, tmp_path, config_path):
  from jaxinfer.cli import main

  code = main(["jaxinfer", "run", "--config", config_path("prefix_sharing"), f"--config.workdir={tmp_path}",
               *(f"--config.{p}.enabled=False" for p in PARTS)])
  assert code == 2 and "every part is disabled" in capsys.readouterr().err
