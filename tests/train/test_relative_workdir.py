"""The README's path: `jaxinfer train` as a subprocess from a fresh current directory, with the relative
workdir that experiments/tiny.py names by default (results/tiny). Orbax rejects relative paths, and only in
its background save thread, so this is the test that keeps that class of failure from landing again."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def _jaxinfer_command():
  exe = shutil.which("jaxinfer")
  return [exe] if exe else [sys.executable, "-m", "jaxinfer.cli"]


def test_relative_workdir_trains_exports_and_resumes(tmp_path, subprocess_env):
  cwd = tmp_path / "fresh"
  cwd.mkdir()
  base = _jaxinfer_command() + ["train", "--config", str(REPO / "experiments" / "tiny.py"),
                                "--config.train.progress=False"]
  proc = subprocess.run(base, cwd=cwd, env=subprocess_env, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-4000:]
  workdir = cwd / "results" / "tiny"
  assert sorted(p.name for p in (workdir / "checkpoints").iterdir()) == ["10", "20"]
  resolved = json.loads((workdir / "resolved_config.json").read_text())
  assert resolved["workdir"] == str(workdir)  # absolute, resolved against the current directory
  assert {"config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in (workdir / "hf").iterdir()}

  # the export loads in transformers, and its logits agree with jaxinfer's own
  import numpy as np
  import torch
  import transformers

  import jaxinfer
  hf = transformers.AutoModelForCausalLM.from_pretrained(workdir / "hf")
  ours = jaxinfer.load_hf(workdir / "hf")
  ids = jaxinfer.load_tokenizer(workdir / "hf").encode("def main():\n    return").ids
  with torch.no_grad():
    want = hf(torch.tensor([ids])).logits.numpy()
  got = np.asarray(ours(np.asarray([ids], np.int32)))
  np.testing.assert_allclose(got, want, rtol=2e-4, atol=2e-4)

  # the same command with more steps resumes from step 20; a relative tokenizer path is resolved too
  proc = subprocess.run(base + ["--config.train.steps=30", "--config.data.tokenizer=results/tiny/tokenizer.json"],
                        cwd=cwd, env=subprocess_env, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-4000:]
  assert "resumed from" in proc.stderr and "at step 20" in proc.stderr
  steps = [json.loads(line)["step"] for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  assert steps == list(range(1, 31))
  assert sorted(p.name for p in (workdir / "checkpoints").iterdir()) == ["20", "30"]
  resolved = json.loads((workdir / "resolved_config.json").read_text())
  assert resolved["data"]["tokenizer"] == str(workdir / "tokenizer.json")
