"""grouped_matmul in XLA: jax.lax.ragged_dot with float32 accumulation (differentiable by JAX's own rules)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels.op import always_available

unavailable_reason = always_available


def grouped_matmul(lhs, rhs, group_sizes, *, preferred_element_type=None, interpret=False):
  del interpret
  out_dtype = preferred_element_type or lhs.dtype
  prec = jax.lax.Precision.HIGHEST if lhs.dtype == jnp.float32 else None
  # ragged_dot counts a negative size as it comes; the op's rule counts it as 0 (api docstring)
  sizes = jnp.maximum(group_sizes, 0)
  out = jax.lax.ragged_dot(lhs, rhs, sizes, precision=prec, preferred_element_type=jnp.float32)
  return out.astype(out_dtype)
