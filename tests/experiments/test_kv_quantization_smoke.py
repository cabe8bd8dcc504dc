"""`jaxinfer run --config experiments/kv_quantization.py --config.smoke=True`: every smoke variant measured,
ratios against the float32 cache from the same run, the table and the plot written."""

import pytest

from jaxinfer.experiments.kv_quantization import SMOKE


def test_kv_quantization_smoke(run_experiment):
  ran = run_experiment("kv_quantization")
  rows = ran.rows("kv_quantization")
  assert [r["variant"] for r in rows] == list(SMOKE["variants"])
  by = {r["variant"]: r for r in rows}
  base = by["float32"]
  assert base["vs_float32"] == 1.0 and base["ppl_increase_pct"] == 0.0 and base["agreement"] == 1.0
  for r in rows:
    assert r["ppl"] > 1.0 and r["decode_tok_s"] > 0
    assert r["vs_float32"] == pytest.approx(r["decode_tok_s"] / base["decode_tok_s"])
  # int8 codes + float32 scales: well under half of float32's bytes, so over twice the pages in the budget
  assert by["int8_tok"]["bytes_ratio"] < 0.5 and by["int8_tok"]["pages_in_budget"] > 2 * base["pages_in_budget"]
  assert 0 < by["int8_tok"]["max_logit_err"] and by["int8_tok"]["agreement"] > 0.5
  assert "| int8_tok | int8 | per_token |" in ran.markdown and "Against the papers' claims" in ran.markdown
  assert (ran.dir / "kv_quantization.png").is_file()
