"""Checkpoints: exact resume, and a run killed with SIGKILL in the middle of a checkpoint save."""

import signal
import subprocess
import sys

from jaxinfer.train import train
from jaxinfer.train.checkpoint import checkpoint_dir
from jaxinfer.train.report import read_metrics
from jaxinfer.train.trainer import FAULT_ENV


def test_resume_is_bit_identical(tmp_path, tiny_config, reference_run, losses_of):
  _, ref = reference_run
  assert sorted(ref.losses) == list(range(1, 13))
  # the same 12-step run, stopped after step 8 (as a time-limited job would be), then the same command again
  first = train(tiny_config(tmp_path, steps=12, stop_after=8, checkpoint_every=4, eval_every=0))
  assert first.final_step == 8 and sorted(first.losses) == list(range(1, 9))
  second = train(tiny_config(tmp_path, steps=12, checkpoint_every=4, eval_every=0))
  assert second.start_step == 8 and sorted(second.losses) == [9, 10, 11, 12]
  for step in range(9, 13):
    assert second.losses[step] == ref.losses[step], step  # bit-identical, not approximately equal
  assert losses_of(tmp_path) == ref.losses  # metrics.jsonl: one line per step, across both jobs


def test_sigkill_during_a_save_resumes_from_the_previous_checkpoint(tmp_path, tiny_config, reference_run,
                                                                    subprocess_env):
  _, ref = reference_run
  workdir = tmp_path / "killed"
  args = [sys.executable, "-m", "jaxinfer.cli", "train", "--config", "experiments/tiny.py",
          f"--config.workdir={workdir}", "--config.train.steps=12", "--config.train.checkpoint_every=4",
          "--config.train.eval_every=0", "--config.train.export_hf=False", "--config.train.sample_prompts=()",
          f"--config.data.cache_dir={subprocess_env['JAXINFER_CACHE_DIR']}"]
  env = dict(subprocess_env, **{FAULT_ENV: "8"})  # SIGKILL right after the step-8 save has started
  proc = subprocess.run(args, env=env, capture_output=True, text=True, timeout=300)
  assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
  entries = sorted(p.name for p in checkpoint_dir(workdir).iterdir())
  assert "4" in entries and "8" not in entries, entries  # step 8 never completed
  assert any(name.startswith("8.") for name in entries), entries  # ... its unfinished temporary directory is there
  assert max(r["step"] for r in read_metrics(workdir / "metrics.jsonl")) == 8

  resumed = train(tiny_config(workdir, steps=12, checkpoint_every=4, eval_every=0))
  assert resumed.start_step == 4
  for step in range(5, 13):
    assert resumed.losses[step] == ref.losses[step], step
  assert [r["step"] for r in read_metrics(workdir / "metrics.jsonl")] == list(range(1, 13))
  entries = sorted(p.name for p in checkpoint_dir(workdir).iterdir())
  assert entries == ["12", "8"], entries  # keep_checkpoints=2; the stale temporary directory is gone
