"""Public entry point `flash_attention(..., implementation=None)` and its op table (pallas_kernels.op.Op).

Each implementation is a module exposing `flash_attention(q, k, v, **same keywords, interpret=...)` (plus its
own block-size keywords, reachable by calling the module directly) and `unavailable_reason(interpret)`.
Adding an implementation is one entry in the modules table of `IMPLEMENTATIONS` (see pallas_kernels.op).
"""

from __future__ import annotations

from pallas_kernels.flash_attention import _common
from pallas_kernels.op import PALLAS_DEFAULTS, STANDARD_MODULES, Op, implementation_table

_PACKAGE = "pallas_kernels.flash_attention"

# name -> module implementing it (imported on first use): reference.py, xla.py, gpu.py, tpu.py, cudnn.py.
IMPLEMENTATIONS: dict[str, str] = implementation_table(_PACKAGE, {**STANDARD_MODULES, "cudnn": "cudnn"})

# backend -> implementations picked by implementation=None, in order of preference (first available wins).
DEFAULT_FOR_BACKEND: dict[str, tuple[str, ...]] = dict(PALLAS_DEFAULTS)

OP = Op("flash_attention", IMPLEMENTATIONS, DEFAULT_FOR_BACKEND)


def implementation_module(name: str):
  """The module of an implementation (ValueError if unknown, RuntimeError if this JAX cannot import it)."""
  return OP.module(name)


def available_implementations(interpret=False) -> list[str]:
  """Names of the implementations that can run on this machine (with the given interpret setting)."""
  return OP.available(interpret)


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
      pallas_tpu, cpu: xla; the choice is logged once). One that cannot run here raises
      pallas_kernels.op.ImplementationUnavailableError (a RuntimeError).
    interpret: run Pallas kernels in interpret mode (CPU); ignored by non-Pallas implementations.

  Returns:
    Output [batch, q_len, q_heads, head_dim] in q's dtype (and lse). A query with no visible key gets zeros
    and lse = -inf, with finite (zero) gradients.
  """
  _common.validate(q, k, v, causal=causal, sm_scale=sm_scale, q_positions=q_positions,
                   kv_positions=kv_positions, q_segment_ids=q_segment_ids, kv_segment_ids=kv_segment_ids,
                   sliding_window=sliding_window, logits_soft_cap=logits_soft_cap)
  fn = OP.function(implementation, interpret)
  return fn(q, k, v, causal=causal, sm_scale=sm_scale, q_positions=q_positions, kv_positions=kv_positions,
            q_segment_ids=q_segment_ids, kv_segment_ids=kv_segment_ids, sliding_window=sliding_window,
            logits_soft_cap=logits_soft_cap, return_lse=return_lse, interpret=interpret)
