"""`jaxinfer run --config experiments/quickstart.py` (driver "train") at tiny sizes: the train driver trains and
writes its workdir (metrics.jsonl, results.md, loss curve) with the shared writer's pieces."""

import json
import math

from jaxinfer.cli import main

# quickstart's smoke setting: the model, data and run of experiments/tiny.py, shorter
SMOKE = ("--config.model.vocab_size=512", "--config.model.hidden_size=64", "--config.model.intermediate_size=176",
         "--config.model.num_layers=1", "--config.model.max_position_embeddings=256", "--config.model.dtype=float32",
         "--config.data.max_bytes=200000", "--config.data.eval_fraction=0.1", "--config.train.steps=6",
         "--config.train.batch_size=8", "--config.train.seq_len=64", "--config.train.warmup_steps=2",
         "--config.train.eval_every=3", "--config.train.eval_batches=1", "--config.train.checkpoint_every=6",
         "--config.train.export_hf=False", "--config.train.sample_prompts=()", "--config.train.progress=False")


def test_quickstart_through_jaxinfer_run(tmp_path, config_path):
  workdir = tmp_path / "qs"
  code = main(["jaxinfer", "run", "--config", config_path("quickstart"), f"--config.workdir={workdir}",
               f"--config.data.cache_dir={tmp_path / 'cache'}", *SMOKE])
  assert code == 0
  records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  train = [r for r in records if "loss" in r]
  assert [r["step"] for r in train] == list(range(1, 7))
  assert all(math.isfinite(r["loss"]) and 0 < r["loss"] < 10 for r in train)  # ln(512) = 6.2 at the start
  evals = [r for r in records if "eval_loss" in r]
  assert [r["step"] for r in evals] == [3, 6]
  results = (workdir / "results.md").read_text()
  assert results.startswith("# quickstart: training results")
  assert "| steps | 6 |" in results and "| final held-out loss |" in results
  assert (workdir / "loss_curve.png").stat().st_size > 1000
  assert not list(workdir.glob("*.tmp*"))  # every file renamed into place
