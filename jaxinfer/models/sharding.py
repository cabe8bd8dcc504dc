"""The logical-axis rules fitted to one model on one mesh (Megatron tensor parallelism for inference).

Starting from a rules table (default: parallel.sharding.DEFAULT_RULES, the one training uses):
- `heads` must divide over its mesh axes (a head is never split; the paged kernels run per shard on whole
  heads): otherwise ConfigError naming the mesh axis field.
- `kv_heads` fewer than the tensor axis (GQA/MQA): the k/v projections are replicated (rule dropped) and the
  KV pool stores each KV head once per shard that needs it (jaxinfer/engine/sharding.py); the tensor size
  must then be a multiple of kv_heads, or a shard's query heads would need two KV heads.
- `vocab` not divisible (XLA shardings must divide evenly): the embedding and lm_head stay replicated over
  the vocabulary, logged once. Everything else that does not divide (e.g. `mlp`) is an error naming the tensor
  and the axis (parallel.sharding.logical_to_spec).
"""

from __future__ import annotations

import logging
import math

from jaxinfer.config import ConfigError
from parallel.sharding import DEFAULT_RULES, normalize_rules

log = logging.getLogger("jaxinfer.sharding")


def _split(table, logical: str, mesh_shape) -> tuple[tuple[str, ...], int]:
  axes = tuple(a for a in table.get(logical, ()) if mesh_shape.get(a, 1) > 1)
  return axes, math.prod(mesh_shape[a] for a in axes)


def check_model_mesh(cfg, mesh_shape, rules=None, *, shapes: bool = True) -> None:
  """Raises ConfigError (`mesh.<axis>: ...`) when the model cannot run on a mesh of these axis sizes.

  Needs only the sizes, so commands call it before loading anything. shapes=False checks only the head
  structure (load_hf then names the first checkpoint tensor that does not divide)."""
  table = normalize_rules(DEFAULT_RULES if rules is None else rules)
  checks = (("heads", cfg.num_heads, "num_heads"),) + ((("mlp", cfg.intermediate_size, "intermediate_size"),)
                                                        if shapes else ())
  for logical, size, what in checks:
    axes, n = _split(table, logical, mesh_shape)
    if size % n:
      raise ConfigError(f"mesh.{axes[0]}: model {what}={size} ({logical!r}) is not divisible by "
                        f"{' x '.join(f'{a}={mesh_shape[a]}' for a in axes)}")
  axes, n = _split(table, "kv_heads", mesh_shape)
  if cfg.num_kv_heads % n and n % cfg.num_kv_heads:
    raise ConfigError(f"mesh.{axes[0]}: model num_kv_heads={cfg.num_kv_heads} neither divides nor is a multiple "
                      f"of {' x '.join(f'{a}={mesh_shape[a]}' for a in axes)} (GQA needs one or the other)")


def model_rules(cfg, mesh, rules=None) -> dict[str, tuple[str, ...]]:
  """The normalised rules table for this model on `mesh` (see the module docstring)."""
  mesh_shape = dict(mesh.shape)
  check_model_mesh(cfg, mesh_shape, rules, shapes=False)
  table = dict(normalize_rules(DEFAULT_RULES if rules is None else rules))
  for logical, size in (("kv_heads", cfg.num_kv_heads), ("vocab", cfg.vocab_size)):
    axes, n = _split(table, logical, mesh_shape)
    if size % n:
      log.info("sharding: %s=%d does not divide over %s=%d: %s kept replicated", logical, size, axes, n,
               "k/v projections" if logical == "kv_heads" else "embedding and lm_head")
      table[logical] = ()
  return table


def kv_replication(cfg, mesh, rules=None) -> int:
  """How many times the KV pool stores each KV head (1 unless kv_heads < the tensor size over kv_heads' axes)."""
  table = normalize_rules(DEFAULT_RULES if rules is None else rules)
  _, n = _split(table, "kv_heads", dict(mesh.shape))
  return n // cfg.num_kv_heads if n > cfg.num_kv_heads else 1
