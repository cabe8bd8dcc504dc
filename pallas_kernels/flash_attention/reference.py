"""Plain-jnp attention in float32: the obviously-correct baseline every fast path is checked against."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels.flash_attention.masks import visible_mask
from pallas_kernels.op import always_available


def attention_reference(q, k, v, *, causal=True, sm_scale=None, q_positions=None, kv_positions=None,
                        q_segment_ids=None, kv_segment_ids=None, sliding_window=None,
                        logits_soft_cap=None, return_lse=False):
  """Materialises the full [batch, heads, q_len, kv_len] score matrix. Rows with no visible key give 0."""
  batch, q_len, q_heads, head_dim = q.shape
  kv_len, kv_heads = k.shape[1], k.shape[2]
  group = q_heads // kv_heads
  scale = head_dim ** -0.5 if sm_scale is None else sm_scale
  qf = q.astype(jnp.float32).reshape(batch, q_len, kv_heads, group, head_dim)
  s = jnp.einsum("bqhgd,bkhd->bhgqk", qf, k.astype(jnp.float32)) * scale
  if logits_soft_cap is not None:
    s = logits_soft_cap * jnp.tanh(s / logits_soft_cap)
  mask = visible_mask(batch, q_len, kv_len, causal=causal, q_positions=q_positions, kv_positions=kv_positions,
                      q_segment_ids=q_segment_ids, kv_segment_ids=kv_segment_ids, sliding_window=sliding_window)
  mask = mask[:, None, None]  # [b, 1, 1, q, k]
  s = jnp.where(mask, s, -jnp.inf)
  lse = jax.nn.logsumexp(s, axis=-1)  # -inf where nothing is visible
  p = jnp.where(mask, jnp.exp(s - jnp.where(jnp.isfinite(lse), lse, 0.0)[..., None]), 0.0)
  out = jnp.einsum("bhgqk,bkhd->bqhgd", p, v.astype(jnp.float32)).reshape(batch, q_len, q_heads, head_dim)
  out = out.astype(q.dtype)
  if return_lse:
    return out, lse.reshape(batch, q_heads, q_len)
  return out


# Registry adapter (see api.py): the reference runs everywhere and has no tiles or kernels.
NAME = "reference"


unavailable_reason = always_available


def flash_attention(q, k, v, *, interpret=False, **kwargs):
  del interpret
  return attention_reference(q, k, v, **kwargs)
