"""`jaxinfer run --config experiments/speculative.py --config.smoke=True`: random target, draft and (untrained)
Medusa heads, batch 2."""

import pytest


def test_speculative_smoke(run_experiment):
  ran = run_experiment("speculative")
  rows = ran.rows("speculative")
  assert [(r["method"], r["k"]) for r in rows] == [("plain", 0), ("ngram", 2), ("draft", 2), ("medusa 2", 2)]
  for r in rows:
    assert r["same_as_plain"], r  # greedy: every method gives plain decoding's tokens
    assert r["tok_s"] > 0 and 0 <= r["acceptance"] <= 1 and r["tokens_per_verify"] >= 1
  plain, ngram, draft, medusa = rows
  assert plain["speedup"] == pytest.approx(1.0) and plain["forwards_per_token"] > 0
  assert draft["draft_forwards"] > 0 and ngram["draft_forwards"] == 0
  assert medusa["draft_forwards"] == 0 and medusa["tokens_per_verify"] >= 1
  assert "| 2 | draft | 2 |" in ran.markdown and "| 2 | medusa 2 | 2 |" in ran.markdown
  assert (ran.dir / "tokens_per_step.png").is_file()
