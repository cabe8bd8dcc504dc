"""`jaxinfer train --config experiments/tiny.py` end to end: metrics, checkpoint, export, plot, report, samples."""

import json

from jaxinfer.cli import main


def test_tiny_experiment_trains_end_to_end(tmp_path, capsys, cache_dir):
  workdir = tmp_path / "tiny"
  code = main(["jaxinfer", "train", "--config", "experiments/tiny.py", f"--config.workdir={workdir}",
               f"--config.data.cache_dir={cache_dir}", "--config.seed=1"])
  out = capsys.readouterr().out
  assert code == 0
  records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  assert [r["step"] for r in records] == list(range(1, 21))
  for r in records:
    assert {"step", "loss", "tokens_per_sec", "mfu", "grad_norm", "learning_rate"} <= set(r)
  first, last = records[0]["loss"], sum(r["loss"] for r in records[-5:]) / 5
  assert last < first - 0.5, (first, last)
  assert "eval_loss" in records[-1] and records[-1]["eval_loss"] < first
  assert sorted(p.name for p in (workdir / "checkpoints").iterdir()) == ["10", "20"]
  assert {"config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in (workdir / "hf").iterdir()}
  assert (workdir / "loss_curve.png").stat().st_size > 1000
  results = (workdir / "results.md").read_text()
  assert "unigram entropy" in results and "final held-out loss" in results
  assert "=== sample: 'def '" in out and "MFU assumes CPU" in out

  # the export is a working Hugging Face checkpoint with its tokenizer
  import jaxinfer
  model = jaxinfer.load_hf(workdir / "hf")
  tokenizer = jaxinfer.load_tokenizer(workdir / "hf")
  assert model.config.eos_token_id == tokenizer.token_to_id("<|endoftext|>")
  ids = jaxinfer.generate(model, [tokenizer.encode("import ").ids], 4)[0]
  assert len(ids) >= 1

  # the same command again: everything is already done, it resumes at step 20 and trains nothing
  code = main(["jaxinfer", "train", "--config", "experiments/tiny.py", f"--config.workdir={workdir}",
               f"--config.data.cache_dir={cache_dir}", "--config.seed=1", "--config.train.sample_prompts=()"])
  assert code == 0
  assert len((workdir / "metrics.jsonl").read_text().splitlines()) == 20
