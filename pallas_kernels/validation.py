"""Argument checks shared by every op's public function: each raises ValueError naming the argument.

Shapes and dtypes are static, so these also work under jit (values of traced arrays cannot be checked there).
"""

from __future__ import annotations

import numbers

import jax.numpy as jnp


def _is_array(x) -> bool:
  return hasattr(x, "shape") and hasattr(x, "dtype")


def check_array(x, name: str, ndim: int, layout: str, *, floating: bool = False, integer: bool = False):
  """x is an array of rank `ndim` (layout: its dims in words, for the message), optionally float / int."""
  if not _is_array(x):
    raise ValueError(f"{name} must be an array {layout}, got {type(x).__name__}")
  if x.ndim != ndim:
    raise ValueError(f"{name} must have rank {ndim} {layout}, got shape {tuple(x.shape)}")
  if floating and not jnp.issubdtype(x.dtype, jnp.floating):
    raise ValueError(f"{name} must be a floating-point array, got dtype {x.dtype}")
  if integer and not jnp.issubdtype(x.dtype, jnp.integer):
    raise ValueError(f"{name} must be an integer (int32) array, got dtype {x.dtype}")


def check_shape(x, name: str, shape: tuple, layout: str):
  if tuple(x.shape) != tuple(shape):
    raise ValueError(f"{name} must have shape {tuple(shape)} {layout}, got {tuple(x.shape)}")


def check_int_array(x, name: str, shape: tuple, layout: str):
  """An optional (None allowed) integer array of exactly `shape`."""
  if x is None:
    return
  if not _is_array(x):
    raise ValueError(f"{name} must be an int32 array of shape {tuple(shape)} {layout}, got {type(x).__name__}")
  check_shape(x, name, shape, layout)
  if not jnp.issubdtype(x.dtype, jnp.integer):
    raise ValueError(f"{name} must be an integer (int32) array, got dtype {x.dtype}")


def check_qkv(q, k, v, *, k_name: str = "k", v_name: str = "v"):
  """q [..., q_heads, head_dim]; k, v [..., kv_heads, head_dim] with one dtype and GQA-compatible heads."""
  if k.dtype != q.dtype or v.dtype != q.dtype:
    raise ValueError(f"q, {k_name} and {v_name} must share one dtype, got q={q.dtype}, {k_name}={k.dtype}, "
                     f"{v_name}={v.dtype}")
  if tuple(v.shape) != tuple(k.shape):
    raise ValueError(f"{v_name} must have the shape of {k_name} {tuple(k.shape)}, got {tuple(v.shape)}")
  q_heads, head_dim = q.shape[-2], q.shape[-1]
  kv_heads = k.shape[-2]
  if k.shape[-1] != head_dim:
    raise ValueError(f"{k_name} head_dim {k.shape[-1]} does not match q head_dim {head_dim}")
  if head_dim == 0:
    raise ValueError("head_dim must be positive")
  if kv_heads == 0 or q_heads % kv_heads:
    raise ValueError(f"q_heads ({q_heads}) must be a multiple of kv_heads ({kv_heads}) for GQA/MQA")


def _is_int(x) -> bool:
  return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def check_positive_int(name: str, value, *, allow_none: bool = True):
  if value is None and allow_none:
    return
  if not _is_int(value) or value < 1:
    raise ValueError(f"{name} must be a positive int{' or None' if allow_none else ''}, got {value!r}")


def check_options(*, sm_scale=None, sliding_window=None, logits_soft_cap=None, num_splits=None):
  """The score options every attention op shares (None: not used)."""
  check_positive_int("sliding_window", sliding_window)
  if logits_soft_cap is not None:
    if not isinstance(logits_soft_cap, numbers.Real) or not logits_soft_cap > 0:
      raise ValueError(f"logits_soft_cap must be a positive float or None, got {logits_soft_cap!r}")
  if sm_scale is not None and (not isinstance(sm_scale, numbers.Real) or isinstance(sm_scale, bool)):
    raise ValueError(f"sm_scale must be a Python float or None, got {sm_scale!r}")
  check_positive_int("num_splits", num_splits)


def check_block(name: str, value, *, implementation: str, minimum: int = 1, power_of_two: bool = False,
                multiple_of: int = 1):
  """A block-size keyword of one implementation."""
  if not _is_int(value) or value < minimum:
    raise ValueError(f"{name}={value!r} for implementation={implementation!r}: must be an int >= {minimum}")
  if power_of_two and value & (value - 1):
    raise ValueError(f"{name}={value} for implementation={implementation!r}: must be a power of two")
  if value % multiple_of:
    raise ValueError(f"{name}={value} for implementation={implementation!r}: must be a multiple of {multiple_of}")
