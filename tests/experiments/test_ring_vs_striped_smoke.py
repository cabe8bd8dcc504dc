"""`jaxinfer run --config experiments/ring_vs_striped.py --config.smoke=True`: tile counts and memory rows."""

import pytest


def test_ring_vs_striped_smoke(run_experiment):
  ran = run_experiment("ring_vs_striped")
  rows = ran.rows("load_balance")
  assert [(r["devices"], r["seq_len"]) for r in rows] == [(2, 1024), (2, 2048), (4, 1024), (4, 2048)]
  for r in rows:
    n = r["seq_len"] // r["devices"] // 128  # tiles per device block
    # contiguous: one half-masked diagonal step + N-1 full steps on the last device; striped: N half steps
    assert r["contiguous_critical"] == n * (n + 1) // 2 + (r["devices"] - 1) * n * n
    assert r["striped_critical"] == r["devices"] * n * (n + 1) // 2
    assert r["striped_balance"] == pytest.approx(1.0) and r["zigzag_balance"] == pytest.approx(1.0)
    assert r["contiguous_balance"] < 1.0
    assert r["striped_speedup"] == pytest.approx(r["contiguous_critical"] / r["striped_critical"])
    assert r["contiguous_speedup"] == pytest.approx(1.0)
    assert len(r["zigzag_per_step_max"]) == r["devices"]
  assert "| 2 | 1k | 128x128 | 26 | 20 | 18 | 1.300x | 1.444x |" in ran.markdown

  mem = ran.rows("memory")
  assert [m["devices"] for m in mem] == [1, 2]
  length, heads, head_dim, bf16 = 512, 2, 16, 2
  for m in mem:
    n = m["devices"]
    # q, k, v (bfloat16) and the int32 positions, each sharded over the sequence
    assert m["argument_bytes"] == (3 * length * heads * head_dim * bf16 + length * 4) // n
    assert m["output_bytes"] >= 3 * length * heads * head_dim * bf16 // n  # the three gradients
    assert m["total_bytes"] == m["argument_bytes"] + m["output_bytes"] + m["temp_bytes"] - m["alias_bytes"]
  assert mem[1]["total_bytes"] < mem[0]["total_bytes"]
  assert "| 1 | 512 | 0.10 |" in ran.markdown
  assert (ran.dir / "ring_vs_striped.png").stat().st_size > 10_000


def test_bad_section_field_is_named(capsys, tmp_path, config_path):
  from jaxinfer.cli import main

  code = main(["jaxinfer", "run", "--config", config_path("ring_vs_striped"), "--config.smoke=True",
               f"--config.workdir={tmp_path}", "--config.memory.total_len=500"])
  assert code == 2
  assert "memory.total_len: 500 is not divisible by 2 * max(memory.devices)" in capsys.readouterr().err
  assert not list(tmp_path.iterdir())  # nothing written
