"""`jaxinfer run --config experiments/kv_compression.py --config.smoke=True`: every part measured on a random
model, for each KV dtype; ratios against the no-policy engine from the same run, tables and plot written."""

import pytest

from jaxinfer.experiments.kv_compression import POLICIES, SMOKE


def test_kv_compression_smoke(run_experiment):
  ran = run_experiment("kv_compression")
  quality, probe, engine = ran.rows("quality"), ran.rows("probe"), ran.rows("engine")
  for rows, dtypes in ((quality, SMOKE["kv_dtypes"]), (probe, SMOKE["probe_kv_dtypes"])):
    assert [(r["kv_dtype"], r["fraction"]) for r in rows] == [(d, f) for d in dtypes for f in SMOKE["fractions"]]
  by_q = {(r["kv_dtype"], r["fraction"]): r for r in quality}
  for d in SMOKE["kv_dtypes"]:
    full = by_q[d, 1.0]
    for name in POLICIES:  # at 100% of the context nothing is evicted: every policy is full attention
      assert full[name] == pytest.approx(full["full"], rel=1e-4)
    assert abs(by_q[d, 0.25]["streaming"] - full["full"]) > 1e-7 * full["full"]  # a 25% budget evicts
    assert abs(by_q[d, 0.25]["h2o"] - full["full"]) > 1e-7 * full["full"]
  for r in probe:
    assert all(0.0 <= r[name] <= 1.0 and 0.0 <= r[name + "_greedy"] <= r[name] for name in POLICIES)
  by = {r["setup"]: r for r in engine}
  assert by["none"]["vs_none"] == 1.0 and set(by) == {"none", "h2o_unscored@0.5"}
  for r in engine:
    assert r["decode_tok_s"] > 0 and r["vs_none"] == pytest.approx(r["decode_tok_s"] / by["none"]["decode_tok_s"])
  assert by["h2o_unscored@0.5"]["pages"] < by["none"]["pages"]  # compacted to its budget
  assert "## Perplexity against the KV budget" in ran.markdown and "Against the papers' claims" in ran.markdown
  assert (ran.dir / "kv_compression.png").is_file()
