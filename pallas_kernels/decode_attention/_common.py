"""Shared pieces of the decode-time attention ops (decode_attention, paged_attention, ragged_paged_attention):
the static score parameters, input validation helpers, the implementation registry and the log-sum-exp merge
of split-K partials."""

from __future__ import annotations

import dataclasses
import importlib
import logging
import numbers
import types

import jax
import jax.numpy as jnp

# Reused from flash_attention (by import, not copied): ceil-div, padding and the soft-cap transform.
from pallas_kernels.flash_attention._common import cdiv, pad_axis, round_up, soft_cap  # noqa: F401

logger = logging.getLogger(__name__)

# Number of parallel work items a GPU wants before split-K stops paying (about 2 waves on a 132-SM H100).
GPU_TARGET_PROGRAMS = 264


@dataclasses.dataclass(frozen=True)
class ScoreParams:
  """Static (hashable) score transform and window; `logits_soft_cap` is the name flash_attention's
  `soft_cap` helper reads."""
  sm_scale: float
  sliding_window: int | None
  logits_soft_cap: float | None


def score_params(head_dim: int, sm_scale, sliding_window, logits_soft_cap) -> ScoreParams:
  return ScoreParams(sm_scale=float(head_dim ** -0.5 if sm_scale is None else sm_scale),
                     sliding_window=None if sliding_window is None else int(sliding_window),
                     logits_soft_cap=None if logits_soft_cap is None else float(logits_soft_cap))


# ----------------------------------------------------------------------------------------------- validation


def check_array(x, name: str, ndim: int, layout: str, *, floating: bool = False, integer: bool = False):
  if not hasattr(x, "shape") or not hasattr(x, "dtype"):
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


def check_qkv(q, k, v, *, k_name: str, v_name: str):
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


def check_options(*, sm_scale, sliding_window, logits_soft_cap, num_splits=None):
  if sliding_window is not None:
    if not isinstance(sliding_window, numbers.Integral) or isinstance(sliding_window, bool) or sliding_window < 1:
      raise ValueError(f"sliding_window must be a positive int or None, got {sliding_window!r}")
  if logits_soft_cap is not None:
    if not isinstance(logits_soft_cap, numbers.Real) or not logits_soft_cap > 0:
      raise ValueError(f"logits_soft_cap must be a positive float or None, got {logits_soft_cap!r}")
  if sm_scale is not None and (not isinstance(sm_scale, numbers.Real) or isinstance(sm_scale, bool)):
    raise ValueError(f"sm_scale must be a Python float or None, got {sm_scale!r}")
  if num_splits is not None:
    if not isinstance(num_splits, numbers.Integral) or isinstance(num_splits, bool) or num_splits < 1:
      raise ValueError(f"num_splits must be a positive int or None, got {num_splits!r}")


def validate_decode(q, k, v, kv_lens, *, sm_scale, sliding_window, logits_soft_cap, num_splits):
  """decode_attention's inputs. Raises ValueError naming the argument; shapes are static, so this works
  under jit too (the values of kv_lens cannot be checked there: they are clipped to [0, max_kv_len])."""
  check_array(q, "q", 3, "[batch, q_heads, head_dim]", floating=True)
  check_array(k, "k", 4, "[batch, max_kv_len, kv_heads, head_dim]", floating=True)
  check_array(v, "v", 4, "[batch, max_kv_len, kv_heads, head_dim]", floating=True)
  check_qkv(q, k, v, k_name="k", v_name="v")
  batch = q.shape[0]
  if k.shape[0] != batch:
    raise ValueError(f"k batch {k.shape[0]} does not match q batch {batch}")
  if k.shape[1] == 0:
    raise ValueError(f"k must hold at least one key slot, got shape {tuple(k.shape)}")
  check_array(kv_lens, "kv_lens", 1, "[batch]", integer=True)
  check_shape(kv_lens, "kv_lens", (batch,), "[batch]")
  check_options(sm_scale=sm_scale, sliding_window=sliding_window, logits_soft_cap=logits_soft_cap,
                num_splits=num_splits)


def check_block(name: str, value, *, implementation: str, minimum: int = 1, power_of_two: bool = False,
                multiple_of: int = 1):
  if not isinstance(value, numbers.Integral) or isinstance(value, bool) or value < minimum:
    raise ValueError(f"{name}={value!r} for implementation={implementation!r}: must be an int >= {minimum}")
  if power_of_two and value & (value - 1):
    raise ValueError(f"{name}={value} for implementation={implementation!r}: must be a power of two")
  if value % multiple_of:
    raise ValueError(f"{name}={value} for implementation={implementation!r}: must be a multiple of {multiple_of}")


# ------------------------------------------------------------------------------------------------- registry


class Registry:
  """name -> module path of the implementations of one op, and the backend defaults (as in flash_attention's
  api.py: each module exposes the op's function(s) and `unavailable_reason(interpret)`)."""

  def __init__(self, op: str, implementations: dict[str, str], defaults: dict[str, str]):
    self.op = op
    self.implementations = implementations
    self.defaults = defaults
    self._logged: set[tuple[str, str]] = set()

  def module(self, name: str) -> types.ModuleType:
    if name not in self.implementations:
      raise ValueError(f"unknown implementation={name!r} for {self.op}; choose one of "
                       f"{sorted(self.implementations)} or None")
    return importlib.import_module(self.implementations[name])

  def default(self, backend: str | None = None) -> str:
    backend = backend or jax.default_backend()
    name = self.defaults.get(backend, "xla")
    if (backend, name) not in self._logged:
      self._logged.add((backend, name))
      logger.info("%s: implementation=None on backend %r -> %r", self.op, backend, name)
    return name

  def available(self, interpret=False) -> list[str]:
    return [n for n in self.implementations if self.module(n).unavailable_reason(interpret) is None]

  def resolve(self, implementation, interpret) -> types.ModuleType:
    name = self.default() if implementation is None else implementation
    module = self.module(name)
    reason = module.unavailable_reason(interpret)
    if reason is not None:
      raise RuntimeError(reason)
    return module


def unavailable_on(backend: str, name: str, interpret) -> str | None:
  """unavailable_reason of a Pallas implementation for `backend` ('gpu' or 'tpu')."""
  if interpret or jax.default_backend() == backend:
    return None
  return (f"implementation={name!r} needs a {backend.upper()} backend (the default backend is "
          f"{jax.default_backend()!r}); pass interpret=True to run it in interpret mode on CPU")


# ---------------------------------------------------------------------------------------- split-K merge


def merge_partials(o, lse, axis: int):
  """Merges attention partials over disjoint key sets by log-sum-exp.

  o: float32 [..., S, ..., head_dim] partial outputs (each normalised over its own keys), lse: float32 with
  o's shape minus head_dim (-inf where a partial saw no key), `axis` the split axis (of lse; negative axes
  count from lse's end). Returns (o, lse) with the split axis removed: zeros and -inf where no partial saw a
  key, never NaN.
  """
  axis = axis % lse.ndim
  m = jnp.max(lse, axis=axis, keepdims=True)
  m_safe = jnp.where(jnp.isfinite(m), m, 0.0)
  w = jnp.exp(lse - m_safe)  # exactly 0 for empty partials
  total = jnp.sum(w, axis=axis, keepdims=True)
  out = jnp.sum(w[..., None] * jnp.where(w[..., None] > 0, o, 0.0), axis=axis)
  total_sq = jnp.squeeze(total, axis)
  empty = total_sq == 0.0
  out = out / jnp.where(empty, 1.0, total_sq)[..., None]
  lse_out = jnp.where(empty, -jnp.inf, jnp.squeeze(m_safe, axis) + jnp.log(jnp.where(empty, 1.0, total_sq)))
  return out, lse_out


def default_num_splits(parallel_items: int, max_blocks: int, *, target: int = GPU_TARGET_PROGRAMS,
                       min_blocks_per_split: int = 2) -> int:
  """FlashDecoding's heuristic: split the keys until batch x heads x splits fills the device, keeping at least
  `min_blocks_per_split` key blocks per split."""
  want = cdiv(target, max(1, parallel_items))
  cap = max(1, max_blocks // min_blocks_per_split)
  return int(max(1, min(want, cap)))


def int32(x):
  return jnp.asarray(x, jnp.int32)
