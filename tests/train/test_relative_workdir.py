"""The README's path, `jaxinfer train --config experiments/tiny.py` end to end: a subprocess from a fresh current
directory, with the relative workdir that experiments/tiny.py names by default (results/tiny). Orbax rejects
relative paths, and only in its background save thread, so this is the test that keeps that class of failure
from landing again. The same one training is checked for everything a run writes (metrics, checkpoints, HF
export, plot, report, samples), then the same command is run again (in this process, from the same directory:
nothing left to train) and with more steps (resumes from step 20, a relative tokenizer path resolved too)."""

import json
import logging
import shutil
import subprocess
import sys
from pathlib import Path

from jaxinfer.cli import main

REPO = Path(__file__).resolve().parents[2]


def _jaxinfer_command():
  exe = shutil.which("jaxinfer")
  return [exe] if exe else [sys.executable, "-m", "jaxinfer.cli"]


def test_relative_workdir_trains_exports_and_resumes(tmp_path, subprocess_env, monkeypatch, capsys):
  cwd = tmp_path / "fresh"
  cwd.mkdir()
  args = ["train", "--config", str(REPO / "experiments" / "tiny.py"), "--config.train.progress=False"]
  proc = subprocess.run(_jaxinfer_command() + args, cwd=cwd, env=subprocess_env, capture_output=True, text=True,
                        timeout=600)
  assert proc.returncode == 0, proc.stderr[-4000:]
  workdir = cwd / "results" / "tiny"
  assert sorted(p.name for p in (workdir / "checkpoints").iterdir()) == ["10", "20"]
  resolved = json.loads((workdir / "resolved_config.json").read_text())
  assert resolved["workdir"] == str(workdir)  # absolute, resolved against the current directory

  # what the run wrote: per-step metrics (the loss falls), eval, export, plot, report, samples
  records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  assert [r["step"] for r in records] == list(range(1, 21))
  for r in records:
    assert {"step", "loss", "tokens_per_sec", "mfu", "grad_norm", "learning_rate"} <= set(r)
  first, last = records[0]["loss"], sum(r["loss"] for r in records[-5:]) / 5
  assert last < first - 0.5, (first, last)
  assert "eval_loss" in records[-1] and records[-1]["eval_loss"] < first
  assert {"config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in (workdir / "hf").iterdir()}
  assert (workdir / "loss_curve.png").stat().st_size > 1000
  results = (workdir / "results.md").read_text()
  assert "unigram entropy" in results and "final held-out loss" in results
  assert "=== sample: 'def '" in proc.stdout and "MFU assumes CPU" in proc.stdout

  # the export is a working Hugging Face checkpoint with its tokenizer: it loads in transformers, its logits
  # agree with jaxinfer's own, and jaxinfer generates from it
  import jax
  import numpy as np
  import torch
  from flax import nnx
  import transformers

  import jaxinfer
  hf = transformers.AutoModelForCausalLM.from_pretrained(workdir / "hf")
  ours = jaxinfer.load_hf(workdir / "hf")
  tokenizer = jaxinfer.load_tokenizer(workdir / "hf")
  assert ours.config.eos_token_id == tokenizer.token_to_id("<|endoftext|>")
  ids = tokenizer.encode("def main():\n    return").ids
  with torch.no_grad():
    want = hf(torch.tensor([ids])).logits.numpy()
  graphdef, state = nnx.split(ours)  # under one jit: eagerly every op would compile on its own
  got = np.asarray(jax.jit(lambda st, t: nnx.merge(graphdef, st)(t))(state, np.asarray([ids], np.int32)))
  np.testing.assert_allclose(got, want, rtol=2e-4, atol=2e-4)
  assert len(jaxinfer.generate(ours, [tokenizer.encode("import ").ids], 4)[0]) >= 1

  # the same command again (here, from the same directory): everything is done, it trains nothing
  monkeypatch.chdir(cwd)
  monkeypatch.setenv("JAXINFER_CACHE_DIR", subprocess_env["JAXINFER_CACHE_DIR"])
  capsys.readouterr()
  assert main(["jaxinfer", *args, "--config.train.sample_prompts=()"]) == 0
  assert len((workdir / "metrics.jsonl").read_text().splitlines()) == 20

  # with more steps it resumes from step 20; a relative tokenizer path is resolved too
  # an experiment driver run earlier in this process (same xdist worker) may have raised the jaxinfer logger's
  # level to WARNING; the CLI's log output is what is checked, so put it back for this call
  monkeypatch.setattr(logging.getLogger("jaxinfer"), "level", logging.NOTSET)
  code = main(["jaxinfer", *args, "--config.train.steps=30", "--config.data.tokenizer=results/tiny/tokenizer.json"])
  assert code == 0
  err = capsys.readouterr().err
  assert "resumed from" in err and "at step 20" in err, err[-3000:]
  steps = [json.loads(line)["step"] for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  assert steps == list(range(1, 31))
  assert sorted(p.name for p in (workdir / "checkpoints").iterdir()) == ["20", "30"]
  resolved = json.loads((workdir / "resolved_config.json").read_text())
  assert resolved["data"]["tokenizer"] == str(workdir / "tokenizer.json")
