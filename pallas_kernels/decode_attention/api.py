"""Public entry point `decode_attention(..., implementation=None)`, its op table (pallas_kernels.op.Op) and its
argument checks.

Each implementation module exposes `decode_attention(q, k, v, kv_lens, **same keywords, interpret=...)` (plus
its own block-size keywords, reachable by calling the module directly) and `unavailable_reason(interpret)`.
Adding an implementation is one entry in the modules table of `IMPLEMENTATIONS` (see pallas_kernels.op).
"""

from __future__ import annotations

import jax.numpy as jnp

from pallas_kernels import validation as V
from pallas_kernels.op import PALLAS_DEFAULTS, Op, implementation_table

_PACKAGE = "pallas_kernels.decode_attention"

# name -> module implementing it (imported on first use): reference.py, xla.py, gpu.py, tpu.py.
IMPLEMENTATIONS: dict[str, str] = implementation_table(_PACKAGE)

# backend -> implementations picked by implementation=None, in order of preference (first available wins).
DEFAULT_FOR_BACKEND: dict[str, tuple[str, ...]] = dict(PALLAS_DEFAULTS)

OP = Op("decode_attention", IMPLEMENTATIONS, DEFAULT_FOR_BACKEND)


def validate_decode(q, k, v, kv_lens, *, sm_scale, sliding_window, logits_soft_cap, num_splits, k_scales=None,
                    v_scales=None):
  """decode_attention's inputs. Raises ValueError naming the argument; shapes are static, so this works
  under jit too (the values of kv_lens cannot be checked there: they are clipped to [0, max_kv_len])."""
  V.check_array(q, "q", 3, "[batch, q_heads, head_dim]", floating=True)
  quantized = k_scales is not None or v_scales is not None
  V.check_array(k, "k", 4, "[batch, max_kv_len, kv_heads, head_dim]", floating=not quantized)
  V.check_array(v, "v", 4, "[batch, max_kv_len, kv_heads, head_dim]", floating=not quantized)
  if quantized:
    check_cache_scales(q, k, v, k_scales, v_scales)
  else:
    V.check_qkv(q, k, v)
  batch = q.shape[0]
  if k.shape[0] != batch:
    raise ValueError(f"k batch {k.shape[0]} does not match q batch {batch}")
  if k.shape[1] == 0:
    raise ValueError(f"k must hold at least one key slot, got shape {tuple(k.shape)}")
  V.check_array(kv_lens, "kv_lens", 1, "[batch]", integer=True)
  V.check_shape(kv_lens, "kv_lens", (batch,), "[batch]")
  V.check_options(sm_scale=sm_scale, sliding_window=sliding_window, logits_soft_cap=logits_soft_cap,
                  num_splits=num_splits)


def check_cache_scales(q, k, v, k_scales, v_scales):
  """A quantized contiguous cache: int8 / float8_e4m3fn k and v with float32 scales per token [batch,
  max_kv_len, kv_heads, 1] or per channel of each sequence [batch, 1, kv_heads, head_dim]."""
  import jax

  from pallas_kernels.paged_attention import _quant as Q

  if k_scales is None or v_scales is None:
    raise ValueError("k_scales and v_scales must be given together (a quantized cache has both)")
  for name, x in (("k", k), ("v", v)):
    if jnp.dtype(x.dtype).name not in Q.QUANTIZED_DTYPES:
      raise ValueError(f"{name} with scales must be one of {Q.QUANTIZED_DTYPES}, got dtype {x.dtype}")
  as_q = lambda x: jax.ShapeDtypeStruct(x.shape, q.dtype)  # noqa: E731
  V.check_qkv(q, as_q(k), as_q(v))
  b, L, hkv, d = k.shape
  for name, sc in (("k_scales", k_scales), ("v_scales", v_scales)):
    if not hasattr(sc, "shape") or sc.dtype != jnp.float32 or tuple(sc.shape) not in ((b, L, hkv, 1),
                                                                                     (b, 1, hkv, d)):
      raise ValueError(f"{name} must be float32 of shape {(b, L, hkv, 1)} (per token) or {(b, 1, hkv, d)} (per "
                       f"channel), got {getattr(sc, 'dtype', type(sc).__name__)} {tuple(getattr(sc, 'shape', ()))}")


def available_implementations(interpret=False) -> list[str]:
  """Names of the implementations that can run on this machine (with the given interpret setting)."""
  return OP.available(interpret)


def decode_attention(q, k, v, kv_lens, *, sm_scale=None, sliding_window=None, logits_soft_cap=None,
                     num_splits=None, return_lse=False, implementation=None, interpret=False, k_scales=None,
                     v_scales=None):
  """One new token per sequence attending over a contiguous KV cache, FlashDecoding style (split-K).

  Args:
    q: [batch, q_heads, head_dim], the new token of each sequence; its position is kv_lens - 1.
    k, v: [batch, max_kv_len, kv_heads, head_dim], q's dtype; q_heads a multiple of kv_heads (GQA/MQA).
    kv_lens: int32 [batch], keys 0 .. kv_lens-1 are valid (values are clipped to [0, max_kv_len]).
    sm_scale: score scale, default head_dim ** -0.5.
    sliding_window: if set, key j is visible only when kv_lens - 1 - j < sliding_window.
    logits_soft_cap: if set, scores become cap * tanh(scores / cap) before the mask.
    num_splits: number of key chunks computed in parallel and merged by log-sum-exp (None: a per-
      implementation heuristic that fills the device). Results agree for every value up to rounding.
    return_lse: also return the float32 log-sum-exp [batch, q_heads] (natural log), for merging partials.
    implementation: one of IMPLEMENTATIONS, or None for the backend's default (gpu: pallas_gpu, tpu:
      pallas_tpu, cpu: xla; logged once). One that cannot run here raises RuntimeError.
    interpret: run Pallas kernels in interpret mode (CPU); ignored by the others.
    k_scales, v_scales: float32 scales of a quantized cache (k, v int8 or float8_e4m3fn; real value =
      float32(x) * scale), per token [batch, max_kv_len, kv_heads, 1] or per channel [batch, 1, kv_heads,
      head_dim]. The kernels dequantize the tiles they load; None: a float cache in q's dtype.

  Returns:
    [batch, q_heads, head_dim] in q's dtype (and lse). A row with no visible key (kv_len 0) gets zeros and
    lse -inf. Invisible cache slots may hold anything (even NaN): no implementation lets them through.
  """
  validate_decode(q, k, v, kv_lens, sm_scale=sm_scale, sliding_window=sliding_window,
                  logits_soft_cap=logits_soft_cap, num_splits=num_splits, k_scales=k_scales, v_scales=v_scales)
  fn = OP.function(implementation, interpret)
  quant = {} if k_scales is None else dict(k_scales=k_scales, v_scales=v_scales)
  return fn(q, k, v, kv_lens, sm_scale=sm_scale, sliding_window=sliding_window, logits_soft_cap=logits_soft_cap,
            num_splits=num_splits, return_lse=return_lse, interpret=interpret, **quant)
