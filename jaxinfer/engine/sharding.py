"""The engine on a sharded model: KV pools sharded by kv_heads, paged attention per shard under shard_map.

The layout is read from the model itself (the q projection's sharding says which mesh axes split heads), so
the engine needs no mesh argument: a model loaded with `load_hf(..., mesh=...)` or `init_model(..., mesh=...)`
runs on its mesh. Everything outside attention is left to XLA's partitioner (Auto mesh axes, see
parallel/mesh.py): with Megatron's layout it inserts one all-reduce after o_proj and one after down_proj.

KV heads: the pool holds `kv_heads * kv_repeat` heads split over the heads' mesh axes. kv_repeat > 1 when the
model has fewer KV heads than the tensor size (GQA): head h is stored kv_repeat times, so shard i holds KV head
i // kv_repeat, exactly the one its query heads read; each device keeps 1/tensor of the (repeated) pool.

Data axis: in decode-only steps the sequences (rows of the decode kernel) are split over `data` when their
count divides; prefill (ragged) steps and the other rows run replicated over `data`.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P


@dataclasses.dataclass(frozen=True)
class EngineSharding:
  mesh: Mesh
  head_axes: tuple[str, ...]  # mesh axes splitting heads (and the pool's kv heads)
  kv_repeat: int  # times the pool stores each KV head
  row_axes: tuple[str, ...]  # mesh axes splitting decode rows (data)

  @property
  def heads(self):
    return self.head_axes or None

  def rows(self, n: int):
    size = 1
    for a in self.row_axes:
      size *= self.mesh.shape[a]
    return self.row_axes if self.row_axes and n % size == 0 else None

  def pool_sharding(self) -> NamedSharding:
    return NamedSharding(self.mesh, P(None, None, self.heads, None))

  def heads_spec(self, axis: int) -> P:
    """A PartitionSpec splitting array axis `axis` (a kv-head or head axis) like the pool's kv heads."""
    return P(*(None,) * axis, self.heads)


def _spec_axes(entry) -> tuple[str, ...]:
  return () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)


def engine_sharding(model) -> EngineSharding | None:
  """The sharding of a model's parameters as the engine needs it; None for a model on one device."""
  kernel = model.layers[0].self_attn.q_proj.kernel
  value = kernel.get_value() if hasattr(kernel, "get_value") else None
  sharding = getattr(value, "sharding", None)
  if not isinstance(sharding, NamedSharding) or sharding.mesh.size == 1:
    return None
  mesh, spec = sharding.mesh, sharding.spec
  head_axes = _spec_axes(spec[1] if len(spec) > 1 else None)
  tensor = 1
  for a in head_axes:
    tensor *= mesh.shape[a]
  cfg = model.config
  if cfg.num_heads % tensor or (cfg.num_kv_heads % tensor and tensor % cfg.num_kv_heads):
    raise ValueError(f"model sharded over {head_axes} (size {tensor}): num_heads={cfg.num_heads} and "
                     f"num_kv_heads={cfg.num_kv_heads} must suit it (see jaxinfer.models.sharding)")
  repeat = tensor // cfg.num_kv_heads if tensor > cfg.num_kv_heads else 1
  rows = tuple(a for a in ("data",) if mesh.shape.get(a, 1) > 1)
  return EngineSharding(mesh, head_axes, repeat, rows)


def create_pool(create, sharding: EngineSharding | None):
  """`create()` (a KVPool) built directly in its sharding: each device allocates only its shard."""
  if sharding is None:
    return create()
  abstract = jax.eval_shape(create)
  pool_s = sharding.pool_sharding()
  replicated = NamedSharding(sharding.mesh, P())
  out = jax.tree.map(lambda x: pool_s if x.ndim == 4 else replicated, abstract)
  return jax.jit(create, out_shardings=out)()


def shard_policy_state(pool, sharding: EngineSharding | None):
  """The pool with its KV policy's fresh device state (kv_policies/attention.py PolicyState, as the runner
  just made it) split on kv heads like the pages, so each shard's masked pass and device programs read only
  their own heads' positions and scores. Re-created under jit in that sharding, as create_pool does: each
  device allocates only its shard, and every process of a multi-host mesh builds the same state."""
  if sharding is None or pool.policy is None:
    return pool
  if hasattr(pool.policy, "shard"):  # a state of its own layout (kv_policies/duo_store.py DuoState)
    return pool.replace(policy=pool.policy.shard(sharding))
  from jaxinfer.engine.kv_policies.attention import STATE_HEAD_AXIS, PolicyState

  st = pool.policy
  layers, (slots, kv_heads), (rows, table_slots, _) = len(st.slot_pos), st.slot_pos[0].shape, st.score[0].shape
  if sharding.kv_repeat > 1:  # the state has one column per model kv head, the pool kv_repeat of them
    from jaxinfer.config.schema import ConfigError

    raise ConfigError(f"engine.kv_policy.name: a KV policy on a model sharded over {sharding.head_axes} "
                      f"(size {kv_heads * sharding.kv_repeat}) needs num_kv_heads={kv_heads} divisible by that "
                      f"size (the pool repeats each kv head {sharding.kv_repeat} times); use fewer tensor devices "
                      "or name='none'")
  out = PolicyState(**{name: (NamedSharding(sharding.mesh, sharding.heads_spec(axis)),) * layers
                       for name, axis in STATE_HEAD_AXIS.items()})
  state = jax.jit(lambda: PolicyState.create(layers, slots, kv_heads, rows, table_slots), out_shardings=out)()
  return pool.replace(policy=state)


def repeat_kv(sharding: EngineSharding | None, k):
  """k or v [T, kv_heads, d] -> [T, kv_heads * kv_repeat, d], the pool's head layout."""
  if sharding is None or sharding.kv_repeat == 1:
    return k
  return jnp.repeat(k, sharding.kv_repeat, axis=1)


def per_shard(sharding: EngineSharding, fn, q, kp, vp, rest, rest_specs, q_rows=None):
  """fn(q, kp, vp, *rest) run per shard: q [T, H, d] split on heads (and rows over q_rows), the pages
  [N, ps, K, d] split on kv heads, `rest` with `rest_specs`; the output is laid out as q."""
  qs = P(q_rows, sharding.heads)
  ps = P(None, None, sharding.heads)
  return jax.shard_map(fn, mesh=sharding.mesh, in_specs=(qs, ps, ps, *rest_specs), out_specs=qs,
                       check_vma=False)(q, kp, vp, *rest)


def to_host(x):
  """A device array as NumPy. Across processes (multi-host lockstep: every process calls this at the same
  point) the global value is gathered to every process; otherwise a plain device-to-host copy."""
  import numpy as np

  if getattr(x, "is_fully_addressable", True):
    return np.asarray(x)
  from jax.experimental import multihost_utils

  return np.asarray(multihost_utils.process_allgather(x, tiled=True))
