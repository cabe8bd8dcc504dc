"""Expert parallelism: experts sharded over the `expert` mesh axis, tokens sent to their experts' devices and back.

Inside `with expert_parallel(mesh):` (a mesh whose `expert` axis is > 1) every MoE block runs its experts
through `expert_parallel_experts`, a shard_map that is manual over `expert` only (data, fsdp, tensor stay
automatic, so the logical-axis rules still shard the rest). Per expert-axis device:

  1. its 1/ep share of the tokens (the token dimension is split over `expert`; rows padded to a multiple)
     with their top-k expert ids, already routed;
  2. dispatch: each assignment goes to the device holding its expert (experts are contiguous blocks of
     E/ep); a padded `all_to_all` exchanges [ep, A, d] buffers, A = local tokens * k being the most that
     can go to one device (dropless: no assignment is ever lost to a buffer limit);
  3. the device runs its E/ep local experts on what it received with the model's own `moe_impl`;
  4. combine: the reverse all_to_all brings each result home, where it is weighted and summed per token.

A padded all_to_all moves ep*A rows where a ragged one would move exactly the T*k assignments: the padding is
the price of one static buffer shape. jax.lax.ragged_all_to_all exists in JAX 0.10, but XLA:CPU rejects it
("UNIMPLEMENTED: HLO opcode `ragged-all-to-all` is not supported by XLA:CPU ThunkEmitter"), and every test
machine is a CPU; a ragged variant for GPU/TPU is future work (docs/moe.md).
"""

from __future__ import annotations

import contextlib
import contextvars
import functools

import jax
import jax.numpy as jnp
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from parallel.mesh import ParallelConfigError

AXIS = "expert"
_MESH: contextvars.ContextVar[Mesh | None] = contextvars.ContextVar("expert_mesh", default=None)


@contextlib.contextmanager
def expert_parallel(mesh: Mesh | None):
  """MoE blocks traced within the block dispatch over mesh's `expert` axis (a no-op when it is 1 or absent)."""
  token = _MESH.set(mesh if mesh is not None and mesh.shape.get(AXIS, 1) > 1 else None)
  try:
    yield
  finally:
    _MESH.reset(token)


def current_expert_mesh() -> Mesh | None:
  return _MESH.get()


def _dispatch_combine(experts_fn, num_experts: int, ep: int, tokens, expert_ids, weights, w_gate, w_up, w_down):
  """The per-device body (inside shard_map): local tokens -> their MoE output rows."""
  local_e = num_experts // ep
  t, k = expert_ids.shape
  a = t * k
  flat = expert_ids.reshape(-1)
  dest = flat // local_e  # the sentinel id E (dropped) gives dest == ep: nowhere
  order = jnp.argsort(flat, stable=True)  # experts are contiguous per device, so this groups by dest
  sorted_dest = dest[order]
  starts = jnp.searchsorted(sorted_dest, jnp.arange(ep), side="left")
  slot = jnp.arange(a) - starts[jnp.minimum(sorted_dest, ep - 1)]
  token = order // k
  send = jnp.zeros((ep, a, tokens.shape[-1]), tokens.dtype).at[sorted_dest, slot].set(tokens[token], mode="drop")
  send_ids = jnp.full((ep, a), local_e, jnp.int32).at[sorted_dest, slot].set(
      flat[order] - sorted_dest * local_e, mode="drop")
  recv = jax.lax.all_to_all(send, AXIS, 0, 0, tiled=False)
  recv_ids = jax.lax.all_to_all(send_ids, AXIS, 0, 0, tiled=False)
  rows = recv.reshape(ep * a, -1)
  out = experts_fn(rows, recv_ids.reshape(ep * a, 1), jnp.ones((ep * a, 1), jnp.float32), w_gate, w_up, w_down)
  back = jax.lax.all_to_all(out.reshape(ep, a, -1), AXIS, 0, 0, tiled=False)
  kept = sorted_dest < ep
  result = back[jnp.minimum(sorted_dest, ep - 1), slot]
  result = jnp.where(kept[:, None], result * weights.reshape(-1)[order][:, None].astype(result.dtype), 0)
  return jnp.zeros_like(tokens).at[token].add(result)


def expert_parallel_experts(mesh: Mesh, experts_fn, tokens, expert_ids, weights, w_gate, w_up, w_down):
  """experts_fn's result (see jaxinfer/models/moe_experts.py) computed expert-parallel over mesh's `expert`
  axis. tokens [T, d], expert_ids / weights [T, k], weights of the experts [E, ...] (E divisible by ep)."""
  ep = mesh.shape[AXIS]
  num_experts = w_gate.shape[0]
  if num_experts % ep:
    raise ParallelConfigError(f"mesh.expert: {num_experts} experts cannot be split evenly over an expert axis of "
                              f"size {ep}; use a divisor of model.num_experts")
  t = tokens.shape[0]
  pad = -t % ep
  if pad:  # padding rows are assigned to no expert
    tokens = jnp.pad(tokens, ((0, pad), (0, 0)))
    expert_ids = jnp.pad(expert_ids, ((0, pad), (0, 0)), constant_values=num_experts)
    weights = jnp.pad(weights, ((0, pad), (0, 0)))
  body = functools.partial(_dispatch_combine, experts_fn, num_experts, ep)
  spec = P(AXIS)
  y = jax.shard_map(body, mesh=mesh, in_specs=(spec,) * 6, out_specs=spec, axis_names={AXIS},
                    check_vma=False)(tokens, expert_ids, weights, w_gate, w_up, w_down)
  return y[:t]
