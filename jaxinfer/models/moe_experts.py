"""Expert computation of an MoE block, one function per `moe_impl` (the seam: a new method is a new entry).

Every implementation has the signature

    experts(x [T, d], expert_ids [T, k] int32, weights [T, k], w_gate [E, d, f], w_up [E, d, f],
            w_down [E, f, d]) -> y [T, d]

y[t] = sum_j weights[t, j] * SwiGLU_{expert_ids[t, j]}(x[t]). An expert id equal to E (one past the last
expert) marks an assignment dropped by the capacity limit: it contributes nothing. "dense" is the reference
(every expert on every token, masked); "ragged" sorts the T*k assignments by expert and runs
jax.lax.ragged_dot over the expert groups (dropless: no capacity buffer, no padding); "pallas" is the same
sort with the grouped-matmul kernel of pallas_kernels in place of ragged_dot.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def dense_experts(x, expert_ids, weights, w_gate, w_up, w_down):
  num_experts = w_gate.shape[0]
  dt = x.dtype
  # [T, E] combine weights; the sentinel id E one-hots to all zeros, so dropped assignments vanish.
  combine = jnp.einsum("tk,tke->te", weights.astype(jnp.float32),
                       jax.nn.one_hot(expert_ids, num_experts, dtype=jnp.float32))
  h = jax.nn.silu(jnp.einsum("td,edf->etf", x, w_gate.astype(dt))) * jnp.einsum("td,edf->etf", x, w_up.astype(dt))
  out = jnp.einsum("etf,efd->etd", h, w_down.astype(dt))
  return jnp.einsum("te,etd->td", combine.astype(dt), out)


def sort_by_expert(expert_ids, num_experts: int):
  """(order [T*k] sorting the flattened assignments by expert, token index of each sorted assignment,
  group_sizes [E] int32 of the kept ones). Dropped assignments (id == E) sort last, outside every group."""
  flat = expert_ids.reshape(-1)
  order = jnp.argsort(flat, stable=True)
  token = order // expert_ids.shape[1]
  group_sizes = jnp.bincount(flat, length=num_experts + 1)[:num_experts].astype(jnp.int32)
  return order, token, group_sizes


def grouped_swiglu(xs, group_sizes, w_gate, w_up, w_down, matmul):
  """SwiGLU of rows sorted by group through a grouped matmul `matmul(lhs, rhs [G, K, N], group_sizes)`."""
  dt = xs.dtype
  h = jax.nn.silu(matmul(xs, w_gate.astype(dt), group_sizes)) * matmul(xs, w_up.astype(dt), group_sizes)
  return matmul(h, w_down.astype(dt), group_sizes)


def sorted_experts(matmul):
  """The experts function that sorts assignments by expert and runs SwiGLU through grouped `matmul`."""
  def experts(x, expert_ids, weights, w_gate, w_up, w_down):
    order, token, group_sizes = sort_by_expert(expert_ids, w_gate.shape[0])
    out = grouped_swiglu(x[token], group_sizes, w_gate, w_up, w_down, matmul)
    # Rows past sum(group_sizes) are dropped assignments: masked, whatever the grouped matmul left there.
    kept = jnp.arange(order.shape[0]) < jnp.sum(group_sizes)
    out = jnp.where(kept[:, None], out * weights.reshape(-1)[order][:, None].astype(out.dtype), 0)
    return jnp.zeros_like(x).at[token].add(out)

  return experts


def _ragged_dot(lhs, rhs, group_sizes):
  return jax.lax.ragged_dot(lhs, rhs, group_sizes)


def _pallas_grouped_matmul(lhs, rhs, group_sizes):
  # Imported here: the kernel lives in pallas_kernels and the other implementations must not need it.
  from pallas_kernels import grouped_matmul

  return grouped_matmul(lhs, rhs, group_sizes)


ragged_experts = sorted_experts(_ragged_dot)
pallas_experts = sorted_experts(_pallas_grouped_matmul)

IMPLEMENTATIONS = {"dense": dense_experts, "ragged": ragged_experts, "pallas": pallas_experts}
