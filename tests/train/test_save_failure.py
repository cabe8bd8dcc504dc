"""A checkpoint save that fails in Orbax's background thread stops the run at the next step, with an error
naming the directory and the cause; earlier good checkpoints survive, nothing half-written is left, and the
run resumes from the last good checkpoint.

The fault: the state handler's asynchronous save returns one more commit future that fails with ENOSPC, as a
full disk would (the tests run as root, so an unwritable directory cannot be made with chmod)."""

import errno
import json
import time

import orbax.checkpoint as ocp
import pytest

from jaxinfer.train import train
from jaxinfer.train.checkpoint import CheckpointSaveError, checkpoint_dir


class _DiskFullFuture:
  def result(self, timeout=None):
    raise OSError(errno.ENOSPC, "No space left on device (injected)")


@pytest.fixture
def fail_save_at(monkeypatch):
  """fail_save_at(step): the save of that step fails in the background; every other save is untouched."""
  original = ocp.StandardCheckpointHandler.async_save

  def arm(step):
    async def async_save(self, directory, *args, **kwargs):
      futures = await original(self, directory, *args, **kwargs)
      if f"/{step}.orbax-checkpoint-tmp" in str(directory):
        futures = [_DiskFullFuture()] + list(futures or [])  # fails before the real writes are awaited
      return futures

    monkeypatch.setattr(ocp.StandardCheckpointHandler, "async_save", async_save)

  return arm


def _steps(workdir):
  return [json.loads(line)["step"] for line in (workdir / "metrics.jsonl").read_text().splitlines()]


def test_failed_async_save_stops_the_run_and_keeps_good_checkpoints(tmp_path, tiny_config, fail_save_at,
                                                                    monkeypatch):
  workdir = tmp_path / "run"
  fail_save_at(16)
  with pytest.raises(CheckpointSaveError) as info:
    train(tiny_config(workdir, steps=32, checkpoint_every=8, eval_every=0))
  message = str(info.value)
  assert "step 16" in message and str(checkpoint_dir(workdir)) in message and "No space left" in message
  # stopped in the step after the failed save (step 17, before its metrics are written) or, on a loaded
  # machine, a step or two later; never at the next save (step 24) or the end of the run
  last = max(_steps(workdir))
  assert 16 <= last < 24, last
  entries = sorted(p.name for p in checkpoint_dir(workdir).iterdir())
  assert entries == ["8"], entries  # the good checkpoint is kept; no half-written step-16 directory is left

  # the fault is gone (say, the disk was cleaned): the same command resumes from step 8 and completes
  monkeypatch.undo()
  resumed = train(tiny_config(workdir, steps=32, checkpoint_every=8, eval_every=0))
  assert resumed.start_step == 8 and resumed.final_step == 32
  assert sorted(p.name for p in checkpoint_dir(workdir).iterdir()) == ["24", "32"]


def test_poll_reports_a_failed_commit_without_waiting_for_another_save(tmp_path, fail_save_at):
  import jax.numpy as jnp
  import numpy as np

  from jaxinfer.train.checkpoint import Checkpointer

  fail_save_at(3)
  checkpointer = Checkpointer(tmp_path, keep=2)
  state = {"w": jnp.asarray(np.random.default_rng(0).normal(size=(4, 4)), jnp.float32)}
  checkpointer.save(2, state, {"step": 2})
  checkpointer.poll()
  checkpointer.wait()  # step 2 is fine
  checkpointer.save(3, state, {"step": 3})
  deadline = time.monotonic() + 60
  with pytest.raises(CheckpointSaveError, match="step 3"):
    while time.monotonic() < deadline:  # poll never blocks: it raises once the background commit has ended
      checkpointer.poll()
      time.sleep(0.01)
  checkpointer.close()
  assert sorted(p.name for p in checkpoint_dir(tmp_path).iterdir()) == ["2"]
  with pytest.raises(ValueError, match="absolute"):
    Checkpointer("relative/workdir", keep=1)


def test_failed_final_save_fails_the_run(tmp_path, tiny_config, fail_save_at):
  workdir = tmp_path / "final"
  fail_save_at(6)
  with pytest.raises(CheckpointSaveError, match="step 6"):
    train(tiny_config(workdir, steps=6, checkpoint_every=0, eval_every=0))
  assert not (workdir / "hf").exists()
  assert not any(checkpoint_dir(workdir).iterdir())
