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


class Checkpointer:
  """CheckpointManager with async saves and max_to_keep, for TrainState + JSON meta."""

  def __init__(self, workdir, keep: int, async_save: bool = True):
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=async_save,
                                           cleanup_tmp_directories=True, create=True)
    self.manager = ocp.CheckpointManager(checkpoint_dir(workdir), options=options, item_handlers=_item_handlers())

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def save(self, step: int, state, meta: dict[str, Any]) -> None:
    self.manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                    meta=ocp.args.JsonSave(meta)), force=True)

  def restore(self, step: int, abstract_state) -> tuple[Any, dict]:
    restored = self.manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state),
                                                                  meta=ocp.args.JsonRestore()))
    return restored["state"], dict(restored["meta"])

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()
