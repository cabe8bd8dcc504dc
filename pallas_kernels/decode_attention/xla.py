"""FlashDecoding split-K in plain jnp ("xla"): the CPU default and the baseline of the decode benchmark.

The key axis is viewed as [num_splits, chunk] (a free reshape when num_splits divides max_kv_len, else the
keys are padded); every chunk's partial softmax (max, sum, P V) is computed at once in a single batched
einsum with float32 accumulation, and the partials are merged by log-sum-exp. Matmul operands stay in the
input dtype (P is cast to it before the P V product, as the kernels do). Invisible slots are zeroed before
use, so whatever they hold never reaches the output. A quantized cache (k_scales / v_scales) is dequantized
to q's dtype as the einsums' operand (this op reads the whole contiguous cache in one batched einsum anyway;
the engine's paged path, pallas_kernels.paged_attention, dequantizes page chunk by page chunk).
"""

from __future__ import annotations

import jax.numpy as jnp

from pallas_kernels import decode_common as C
from pallas_kernels.decode_common import decode_mask
from pallas_kernels.lse import merge_partials, normalize
from pallas_kernels.op import always_available

NAME = "xla"
_KEYS_PER_SPLIT = 512  # default chunk length when num_splits is None


unavailable_reason = always_available


def decode_attention(q, k, v, kv_lens, *, sm_scale=None, sliding_window=None, logits_soft_cap=None,
                     num_splits=None, return_lse=False, interpret=False, k_scales=None, v_scales=None):
  """Same contract as `pallas_kernels.decode_attention`. num_splits=None: about one split per 512 keys."""
  del interpret
  if k_scales is not None:
    k = (k.astype(jnp.float32) * k_scales).astype(q.dtype)
    v = (v.astype(jnp.float32) * v_scales).astype(q.dtype)
  b, hq, d = q.shape
  L, hkv = k.shape[1], k.shape[2]
  g = hq // hkv
  params = C.score_params(d, sm_scale, sliding_window, logits_soft_cap)
  S = min(num_splits or C.cdiv(L, _KEYS_PER_SPLIT), L)
  chunk = C.cdiv(L, S)
  S = C.cdiv(L, chunk)
  L_pad = S * chunk
  mask = C.pad_axis(decode_mask(kv_lens, L, params.sliding_window), 1, L_pad, False).reshape(b, S, chunk)
  kx = C.pad_axis(k, 1, L_pad).reshape(b, S, chunk, hkv, d)
  vx = C.pad_axis(v, 1, L_pad).reshape(b, S, chunk, hkv, d)
  m5 = mask[:, :, :, None, None]
  kx = jnp.where(m5, kx, jnp.zeros((), k.dtype))
  vx = jnp.where(m5, vx, jnp.zeros((), v.dtype))
  qx = q.reshape(b, hkv, g, d)
  s = jnp.einsum("bhgd,bschd->bshgc", qx, kx, preferred_element_type=jnp.float32) * params.sm_scale
  s, _ = C.soft_cap(s, params)
  vis = mask[:, :, None, None, :]
  s = jnp.where(vis, s, -jnp.inf)
  m = jnp.max(s, axis=-1)
  m_safe = jnp.where(m == -jnp.inf, 0.0, m)
  p = jnp.exp(s - m_safe[..., None])
  l = jnp.sum(p, axis=-1)
  acc = jnp.einsum("bshgc,bschd->bshgd", p.astype(v.dtype), vx, preferred_element_type=jnp.float32)
  o_part, lse_part = normalize(acc, l, m_safe)
  o, lse = merge_partials(o_part, lse_part, axis=1)  # [b, hkv, g, d], [b, hkv, g]
  o = o.reshape(b, hq, d).astype(q.dtype)
  return (o, lse.reshape(b, hq)) if return_lse else o
