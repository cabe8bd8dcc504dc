"""Public entry point `grouped_matmul(lhs, rhs, group_sizes, *, implementation=None, ...)` (megablox-style
grouped matmul, the semantics of jax.lax.ragged_dot), its op table (pallas_kernels.op.Op) and its checks.

Each implementation module exposes `grouped_matmul(lhs, rhs, group_sizes, *, preferred_element_type,
interpret)` (the Pallas ones also their tile keywords tm/tk/tn and `tgmm`, reachable by calling the module
directly) and `unavailable_reason(interpret)`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels import validation as V
from pallas_kernels.op import PALLAS_DEFAULTS, Op, implementation_table

IMPLEMENTATIONS: dict[str, str] = implementation_table("pallas_kernels.grouped_matmul")
DEFAULT_FOR_BACKEND: dict[str, tuple[str, ...]] = dict(PALLAS_DEFAULTS)
OP = Op("grouped_matmul", IMPLEMENTATIONS, DEFAULT_FOR_BACKEND)


def available_implementations(interpret=False) -> list[str]:
  return OP.available(interpret)


def validate_group_sizes(group_sizes, m: int) -> None:
  """Values of a concrete group_sizes: non-negative with sum <= M (under jit they cannot be read; there a
  negative size counts as 0 and groups are cut at row M, as jax.lax.ragged_dot does)."""
  if isinstance(group_sizes, jax.core.Tracer):
    return
  sizes = np.asarray(group_sizes)
  if (sizes < 0).any():
    raise ValueError(f"group_sizes must be non-negative, got {sizes.tolist()}")
  if int(sizes.sum()) > m:
    raise ValueError(f"group_sizes must sum to at most M={m} (the rows of lhs), got sum {int(sizes.sum())}")


def validate(lhs, rhs, group_sizes, preferred_element_type):
  """Raises ValueError naming the argument and the limit. Returns the output dtype."""
  V.check_array(lhs, "lhs", 2, "[M, K]", floating=True)
  V.check_array(rhs, "rhs", 3, "[G, K, N]", floating=True)
  if rhs.dtype != lhs.dtype:
    raise ValueError(f"lhs and rhs must share one dtype, got lhs={lhs.dtype}, rhs={rhs.dtype}")
  g, k, _ = rhs.shape
  if k != lhs.shape[1]:
    raise ValueError(f"rhs K={k} (rhs [G, K, N]) does not match lhs K={lhs.shape[1]} (lhs [M, K])")
  if g < 1:
    raise ValueError("rhs must hold at least one group (G >= 1)")
  V.check_array(group_sizes, "group_sizes", 1, "[G]", integer=True)
  if group_sizes.shape[0] != g:
    raise ValueError(f"group_sizes must have length G={g} (rhs [G, K, N]), got {group_sizes.shape[0]}")
  validate_group_sizes(group_sizes, lhs.shape[0])
  if preferred_element_type is None:
    return jnp.dtype(lhs.dtype)
  try:
    out = jnp.dtype(preferred_element_type)
  except TypeError as e:
    raise ValueError(f"preferred_element_type must be a floating dtype or None, got {preferred_element_type!r}") from e
  if not jnp.issubdtype(out, jnp.floating):
    raise ValueError(f"preferred_element_type must be a floating dtype or None, got {out}")
  return out


def grouped_matmul(lhs, rhs, group_sizes, *, implementation=None, interpret=False, preferred_element_type=None):
  """out[rows of g] = lhs[rows of g] @ rhs[g], the rows of lhs sorted by group (jax.lax.ragged_dot).

  Args:
    lhs: [M, K] float32 or bfloat16; group g owns rows offsets[g]:offsets[g] + group_sizes[g] with offsets
      the exclusive cumsum of group_sizes.
    rhs: [G, K, N], lhs's dtype.
    group_sizes: integer [G]; non-negative with sum <= M (checked when concrete). Rows at or past the sum get
      zeros (a padded token buffer). Under jit the values cannot be checked: a negative size counts as 0 and
      groups are cut at row M, as ragged_dot does.
    implementation: one of IMPLEMENTATIONS or None (gpu: pallas_gpu, tpu: pallas_tpu, cpu: xla; logged once);
      one that cannot run here raises pallas_kernels.op.ImplementationUnavailableError (a RuntimeError).
    interpret: run the Pallas kernels in interpret mode (CPU).
    preferred_element_type: output dtype (default lhs.dtype); products always accumulate in float32.

  Returns [M, N]. Differentiable in lhs and rhs (the Pallas kernels through a custom_vjp: d_lhs is a grouped
  matmul of d_out with rhs^T, d_rhs the transposed grouped matmul tgmm).
  """
  out_dtype = validate(lhs, rhs, group_sizes, preferred_element_type)
  fn = OP.function(implementation, interpret)
  if 0 in lhs.shape or rhs.shape[2] == 0:  # nothing to tile: no kernel takes an empty operand
    return jnp.zeros((lhs.shape[0], rhs.shape[2]), out_dtype)
  return fn(lhs, rhs, group_sizes.astype(jnp.int32), preferred_element_type=out_dtype, interpret=interpret)
