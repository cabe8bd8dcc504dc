"""`jaxinfer run --config experiments/kv_compression.py --config.smoke=True`: every part measured on a random
model, ratios against the no-policy engine from the same run, tables and plot written."""

import pytest

from jaxinfer.experiments.kv_compression import POLICIES, SMOKE


def test_kv_compression_smoke(run_experiment):
  ran = run_experiment("kv_compression")
  quality, probe, engine = ran.rows("quality"), ran.rows("probe"), ran.rows("engine")
  assert [r["fraction"] for r in quality] == list(SMOKE["fractions"]) == [r["fraction"] for r in probe]
  full = quality[-1]
  for name in POLICIES:  # at 100% of the context nothing is evicted: every policy is full attention
    assert full[name] == pytest.approx(full["full"], rel=1e-4)
    assert 0.0 <= probe[0][name] <= 1.0
  assert abs(quality[0]["streaming"] - quality[0]["full"]) > 1e-7 * quality[0]["full"]  # a 25% budget evicts
  by = {r["setup"]: r for r in engine}
  assert by["none"]["vs_none"] == 1.0
  for r in engine:
    assert r["decode_tok_s"] > 0 and r["vs_none"] == pytest.approx(by["none"]["decode_tok_s"] and
                                                                  r["decode_tok_s"] / by["none"]["decode_tok_s"])
  assert by["snapkv@0.5"]["pages"] < by["none"]["pages"] and by["streaming@0.5"]["pages"] < by["none"]["pages"]
  assert "## Perplexity against the KV budget" in ran.markdown and "Against the papers' claims" in ran.markdown
  assert (ran.dir / "kv_compression.png").is_file()
