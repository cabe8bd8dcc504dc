"""Public entry point: `flash_attention(..., implementation=None)` and the registry of implementations.

Each implementation is a module exposing `flash_attention(q, k, v, **same keywords, interpret=...)` (plus its
own block-size keywords, reachable by calling the module directly) and `unavailable_reason(interpret)`,
which returns None when it can run here or a sentence saying why not. Adding an implementation is one line
in `IMPLEMENTATIONS`.
"""

from __future__ import annotations

import importlib
import logging
import types

import jax

from pallas_kernels.flash_attention import _common

logger = logging.getLogger(__name__)

_PACKAGE = "pallas_kernels.flash_attention"

# name -> module implementing it (imported on first use).
IMPLEMENTATIONS: dict[str, str] = {
    "reference": f"{_PACKAGE}.reference",
    "xla": f"{_PACKAGE}.xla",
    "pallas_gpu": f"{_PACKAGE}.gpu",
    "pallas_tpu": f"{_PACKAGE}.tpu",
    "cudnn": f"{_PACKAGE}.cudnn",
}

# backend -> implementation picked by implementation=None.
DEFAULT_FOR_BACKEND: dict[str, str] = {"gpu": "pallas_gpu", "tpu": "pallas_tpu", "cpu": "xla"}

_logged_choices: set[tuple[str, str]] = set()


def implementation_module(name: str) -> types.ModuleType:
  """The module of an implementation. RuntimeError (naming it) if this JAX cannot import it, e.g. a Pallas
  backend that a later JAX release removed."""
  if name not in IMPLEMENTATIONS:
    raise ValueError(f"unknown implementation={name!r}; choose one of {sorted(IMPLEMENTATIONS)} or None")
  try:
    return importlib.import_module(IMPLEMENTATIONS[name])
  except ImportError as e:
    raise RuntimeError(f"implementation={name!r} cannot be imported with jax {jax.__version__}: {e}") from e


def _unavailable_reason(name: str, interpret) -> str | None:
  try:
    return implementation_module(name).unavailable_reason(interpret)
  except RuntimeError as e:
    return str(e)


def default_implementation(backend: str | None = None) -> str:
  backend = backend or jax.default_backend()
  name = DEFAULT_FOR_BACKEND.get(backend, "xla")
  if (backend, name) not in _logged_choices:
    _logged_choices.add((backend, name))
    logger.info("flash_attention: implementation=None on backend %r -> %r", backend, name)
  return name


def available_implementations(interpret=False) -> list[str]:
  """Names of the implementations that can run on this machine (with the given interpret setting)."""
  return [n for n in IMPLEMENTATIONS if _unavailable_reason(n, interpret) is None]


def flash_attention(q, k, v, *, causal=True, sm_scale=None, q_positions=None, kv_positions=None,
                    q_segment_ids=None, kv_segment_ids=None, sliding_window=None, logits_soft_cap=None,
                    return_lse=False, implementation=None, interpret=False):
  """Attention softmax(q k^T * sm_scale) v with token-position/segment masks, FlashAttention-2 style.

  Args:
    q: [batch, q_len, q_heads, head_dim]; k, v: [batch, kv_len, kv_heads, head_dim], one floating dtype;
      q_heads a multiple of kv_heads (GQA/MQA).
    causal: key j visible to query i only if kv_positions[j] <= q_positions[i].
    sm_scale: score scale, default head_dim ** -0.5.
    q_positions, kv_positions: int32 [batch, len] token positions (default arange), so masks follow tokens
      (chunked prefill, striped layouts).
    q_segment_ids, kv_segment_ids: int32 [batch, len] packing segments, both or neither; a key is visible
      only within its own segment.
    sliding_window: if set, also require q_positions[i] - kv_positions[j] < sliding_window.
    logits_soft_cap: if set, scores become cap * tanh(scores / cap) before the mask.
    return_lse: also return the float32 log-sum-exp [batch, q_heads, q_len] (differentiable).
    implementation: one of IMPLEMENTATIONS, or None for the backend's default (gpu: pallas_gpu, tpu:
      pallas_tpu, cpu: xla; the choice is logged once). One that cannot run here raises RuntimeError.
    interpret: run Pallas kernels in interpret mode (CPU); ignored by non-Pallas implementations.

  Returns:
    Output [batch, q_len, q_heads, head_dim] in q's dtype (and lse). A query with no visible key gets zeros
    and lse = -inf, with finite (zero) gradients.
  """
  _common.validate(q, k, v, causal=causal, sm_scale=sm_scale, q_positions=q_positions,
                   kv_positions=kv_positions, q_segment_ids=q_segment_ids, kv_segment_ids=kv_segment_ids,
                   sliding_window=sliding_window, logits_soft_cap=logits_soft_cap)
  name = default_implementation() if implementation is None else implementation
  module = implementation_module(name)
  reason = module.unavailable_reason(interpret)
  if reason is not None:
    raise RuntimeError(reason)
  return module.flash_attention(q, k, v, causal=causal, sm_scale=sm_scale, q_positions=q_positions,
                                kv_positions=kv_positions, q_segment_ids=q_segment_ids,
                                kv_segment_ids=kv_segment_ids, sliding_window=sliding_window,
                                logits_soft_cap=logits_soft_cap, return_lse=return_lse, interpret=interpret)
