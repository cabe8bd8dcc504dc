"""Orbax checkpoints of the whole training state, and the resume / compatibility rules.

Layout: <workdir>/checkpoints/<step>/{state, meta}. `state` is the TrainState pytree (params, optimizer state,
step, RNG key data) saved with StandardSave (each process writes its own shards); `meta` is JSON: step, data
iterator position, the model config, every parameter's shape, and the resolved experiment config.

Orbax writes each step under a temporary name and renames it when complete (saves are asynchronous: training
continues while the files are written), so a run killed mid-save leaves only an unfinished temporary
directory, which is ignored and cleaned up; `latest_step()` is always a complete checkpoint.
"""

from __future__ import annotations

import dataclasses
import logging
import shutil
import threading
import time
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp

from jaxinfer.config import ConfigError
from jaxinfer.models.config import ModelConfig

log = logging.getLogger("jaxinfer.train")

SHAPE_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads",
                "head_dim", "tie_word_embeddings", "attention_bias", "qkv_bias", "mlp_bias", "qk_norm",
                "param_dtype")


def checkpoint_dir(workdir) -> Path:
  return Path(workdir) / "checkpoints"


def _item_handlers():
  return {"state": ocp.StandardCheckpointHandler(), "meta": ocp.JsonCheckpointHandler()}


def peek_latest(workdir) -> tuple[int, dict] | None:
  """(step, meta) of the newest complete checkpoint in workdir, read without writing anything; or None."""
  directory = checkpoint_dir(workdir)
  if not directory.is_dir():
    return None
  manager = ocp.CheckpointManager(directory, options=ocp.CheckpointManagerOptions(read_only=True, create=False),
                                  item_handlers=_item_handlers())
  try:
    step = manager.latest_step()
    if step is None:
      return None
    meta = manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
    return step, dict(meta)
  finally:
    manager.close()


def param_shapes(abstract_params) -> dict[str, list[int]]:
  from parallel.sharding import _path_name

  out = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(abstract_params)[0]:
    name = _path_name(path)
    out[name.removesuffix(".value")] = list(leaf.shape)
  return out


def check_compatible(workdir, step: int, meta: dict, cfg: ModelConfig, shapes: dict[str, list[int]]) -> None:
  """Raises ConfigError (naming the model fields that differ) if the checkpoint holds another model shape."""
  saved_model = meta.get("model", {})
  current = dataclasses.asdict(cfg)
  differ = [f for f in SHAPE_FIELDS if f in saved_model and saved_model[f] != current[f]]
  saved_shapes = meta.get("param_shapes", {})
  shape_diff = sorted(n for n in set(saved_shapes) | set(shapes) if saved_shapes.get(n) != shapes.get(n))
  if differ or shape_diff:
    fields = ", ".join(f"model.{f} is {saved_model[f]!r} there but {current[f]!r} here" for f in differ)
    params = ", ".join(f"{n}: {saved_shapes.get(n)} vs {shapes.get(n)}" for n in shape_diff[:4])
    raise ConfigError(
        f"workdir: {workdir} holds a checkpoint (step {step}) of a different model"
        + (f" ({fields})" if fields else "") + (f"; parameter shapes differ ({params})" if params else "")
        + ". Use another workdir, or delete its checkpoints/ to start over; nothing was written.")


class CheckpointSaveError(RuntimeError):
  """A checkpoint could not be written; the message names the step, the directory and the cause."""


class _SaveWatch:
  """Waits for one save's background commit in a thread of its own and records how it ended."""

  def __init__(self, step: int, manager):
    self.step, self.error, self.done = step, None, threading.Event()

    def wait():
      try:
        manager.wait_until_finished()
      except BaseException as e:  # noqa: BLE001 - re-raised in the training thread by Checkpointer
        self.error = e
      finally:
        self.done.set()

    threading.Thread(target=wait, name=f"jaxinfer-save-watch-{step}", daemon=True).start()


class Checkpointer:
  """CheckpointManager with async saves and max_to_keep, for TrainState + JSON meta.

  An asynchronous save runs in Orbax's background threads, where an error is only logged; `poll()` (called
  after every train step) and `save()`/`close()` re-raise it as CheckpointSaveError, so a run never carries on
  without the checkpoints it asked for. The failed step's temporary directory is removed (nothing is left
  half-written) and the complete checkpoints before it are untouched (Orbax only deletes old steps after a
  save commits).
  """

  def __init__(self, workdir, keep: int, async_save: bool = True):
    directory = checkpoint_dir(workdir)
    if not directory.is_absolute():
      # Orbax's tensorstore writer rejects relative paths, but only in its background thread, after training
      raise ValueError(f"Checkpointer: workdir must be an absolute path, got {str(workdir)!r}")
    self.directory = directory
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=async_save,
                                           cleanup_tmp_directories=True, create=True)
    self.manager = ocp.CheckpointManager(directory, options=options, item_handlers=_item_handlers())
    self._pending: _SaveWatch | None = None  # the save whose outcome has not been checked yet
    self._failed_step: int | None = None

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def save(self, step: int, state, meta: dict[str, Any]) -> None:
    self._finish_pending()  # Orbax would wait for it anyway; this surfaces its error first
    try:
      self.manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                      meta=ocp.args.JsonSave(meta)), force=True)
    except Exception as e:  # noqa: BLE001 - any failure to start the save is fatal to the run
      self._fail(step, e)
    # A watcher thread waits for the background commit, so that poll() learns of its end without blocking
    # (Orbax's own is_saving_in_progress stays True after a failed commit).
    self._pending = _SaveWatch(step, self.manager)

  def poll(self) -> None:
    """Raises CheckpointSaveError if an asynchronous save has finished with an error; never blocks."""
    if self._pending is not None and self._pending.done.is_set():
      self._finish_pending()

  def _finish_pending(self) -> None:
    watch, self._pending = self._pending, None
    if watch is None:
      return
    watch.done.wait()
    if watch.error is not None:
      self._fail(watch.step, watch.error)

  def _fail(self, step: int | None, error: BaseException):
    self._failed_step = step
    self._remove_partial(step)
    raise CheckpointSaveError(f"saving the checkpoint of step {step} to {self.directory} failed: "
                              f"{type(error).__name__}: {error}") from error

  def restore(self, step: int, abstract_state) -> tuple[Any, dict]:
    restored = self.manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state),
                                                                  meta=ocp.args.JsonRestore()))
    return restored["state"], dict(restored["meta"])

  def wait(self) -> None:
    self._finish_pending()

  def close(self) -> None:
    try:
      self._finish_pending()
    finally:
      try:
        self.manager.close()
      except Exception:  # noqa: BLE001
        if self._failed_step is None:
          raise
        # Orbax re-raises the failure it already reported; CheckpointSaveError carries it
        log.debug("checkpoint manager close after a failed save", exc_info=True)
      if self._failed_step is not None:
        # writes of the failed save that had not failed themselves may still be landing (Orbax gives no handle
        # on them): remove what they leave until the folder has stayed gone for 2 s (bounded), so a failed save
        # leaves nothing behind; a remainder would still be ignored and cleaned up by the next run's start
        deadline, quiet_since = time.monotonic() + 30.0, time.monotonic()
        while time.monotonic() < deadline and time.monotonic() - quiet_since < 2.0:
          if self._remove_partial(self._failed_step):
            quiet_since = time.monotonic()
          time.sleep(0.1)

  def _remove_partial(self, step) -> bool:
    """Removes the temporary folder(s) of an unfinished save of `step`; True if there was one."""
    found = False
    for tmp in self.directory.glob(f"{step}.orbax-checkpoint-tmp*"):
      shutil.rmtree(tmp, ignore_errors=True)
      found = True
    return found
