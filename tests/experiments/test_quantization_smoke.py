"""`jaxinfer run --config experiments/quantization.py --config.smoke=True`: every smoke variant measured, ratios
against bf16 from the same run, the table and the plot written."""

import pytest

from jaxinfer.experiments.quantization import SMOKE


def test_quantization_smoke(run_experiment):
  ran = run_experiment("quantization")
  rows = ran.rows("quantization")
  assert [r["variant"] for r in rows] == list(SMOKE["variants"])
  by = {r["variant"]: r for r in rows}
  assert by["bf16"]["vs_bf16"] == 1.0 and by["float32"]["ppl_increase_pct"] == 0.0
  for r in rows:
    assert r["ppl"] > 1.0 and r["decode_tok_s"] > 0 and r["weight_mb"] > 0
    assert r["vs_bf16"] == pytest.approx(r["decode_tok_s"] / by["bf16"]["decode_tok_s"])
    assert r["ppl_increase_pct"] == pytest.approx(100 * (r["ppl"] / by["float32"]["ppl"] - 1))
  # stored bytes: bf16 half of float32; int4 codes (plus float16 scales and zeros) under bf16
  assert by["bf16"]["weight_mb"] == pytest.approx(by["float32"]["weight_mb"] / 2)
  assert by["gptq4_act"]["linear_mb"] < by["bf16"]["linear_mb"]  # (the float lm_head counts as a linear too)
  assert by["float32"]["layer_error"] is None and 0 < by["gptq4_act"]["layer_error"] < 0.5
  assert "| gptq4_act | gptq 4-bit g32 act-order |" in ran.markdown and "Against the papers' claims" in ran.markdown
  assert (ran.dir / "quantization.png").is_file()


def test_checkpoint_without_config_names_the_field(capsys, tmp_path):
  from jaxinfer.cli import main

  from tests.experiments.conftest import EXPERIMENTS

  code = main(["jaxinfer", "run", "--config", str(EXPERIMENTS / "quantization.py"), f"--config.workdir={tmp_path}",
               f"--config.quantization.checkpoint={tmp_path}/nothing"])
  assert code == 2
  assert "quantization.checkpoint:" in capsys.readouterr().err
