"""Hydragen in XLA: attention over the shared prefix as one batched matmul over all sequences' queries,
attention over each sequence's own suffix separately, merged exactly by log-sum-exp.

Without sharing, a decode step reads the prefix once per sequence and does batch x q_heads matrix-vector
products against it. Here all batch * group query vectors of a KV head meet the prefix in one
[batch * group, head_dim] x [head_dim, prefix_len] matrix product, and the prefix is read once.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels.shared_prefix_attention.merge import merge_partials


def _softmax_parts(scores, values_fn):
  """Normalised output and lse of masked scores (-inf = hidden); fully hidden rows give 0 / -inf."""
  m = jnp.max(scores, axis=-1, keepdims=True)
  m_safe = jnp.where(jnp.isneginf(m), 0.0, m)
  p = jnp.exp(scores - m_safe)
  denom = jnp.sum(p, axis=-1)
  empty = denom == 0
  out = values_fn(p) / jnp.where(empty, 1.0, denom)[..., None]
  lse = jnp.where(empty, -jnp.inf, jnp.log(jnp.where(empty, 1.0, denom)) + m_safe[..., 0])
  return out, lse


def prefix_part(q, prefix_k, prefix_v, scale):
  """q [batch, q_heads, d]; prefix [P, kv_heads, d] -> out [batch, q_heads, d] f32, lse [batch, q_heads]."""
  batch, q_heads, d = q.shape
  kv_heads = prefix_k.shape[1]
  group = q_heads // kv_heads
  # [kv_heads, batch * group, d]: every sequence's queries of one KV head stacked into one matrix
  qs = q.astype(jnp.float32).reshape(batch, kv_heads, group, d).transpose(1, 0, 2, 3).reshape(kv_heads, -1, d)
  scores = jnp.einsum("hnd,phd->hnp", qs, prefix_k.astype(jnp.float32)) * scale
  out, lse = _softmax_parts(scores, lambda p: jnp.einsum("hnp,phd->hnd", p, prefix_v.astype(jnp.float32)))
  out = out.reshape(kv_heads, batch, group, d).transpose(1, 0, 2, 3).reshape(batch, q_heads, d)
  return out, lse.reshape(kv_heads, batch, group).transpose(1, 0, 2).reshape(batch, q_heads)


def suffix_part(q, suffix_k, suffix_v, suffix_lens, scale):
  """Each sequence against its own suffix [batch, S, kv_heads, d]; slots >= suffix_lens are hidden."""
  batch, q_heads, d = q.shape
  kv_heads = suffix_k.shape[2]
  group = q_heads // kv_heads
  qg = q.astype(jnp.float32).reshape(batch, kv_heads, group, d)
  scores = jnp.einsum("bhgd,bshd->bhgs", qg, suffix_k.astype(jnp.float32)) * scale
  valid = jnp.arange(suffix_k.shape[1])[None, :] < suffix_lens[:, None]
  scores = jnp.where(valid[:, None, None, :], scores, -jnp.inf)
  out, lse = _softmax_parts(scores, lambda p: jnp.einsum("bhgs,bshd->bhgd", p, suffix_v.astype(jnp.float32)))
  return out.reshape(batch, q_heads, d), lse.reshape(batch, q_heads)


def shared_prefix_attention(q, prefix_k, prefix_v, suffix_k, suffix_v, suffix_lens, *, sm_scale=None,
                            return_lse=False):
  scale = q.shape[-1] ** -0.5 if sm_scale is None else sm_scale
  out_p, lse_p = prefix_part(q, prefix_k, prefix_v, scale)
  out_s, lse_s = suffix_part(q, suffix_k, suffix_v, suffix_lens, scale)
  out, lse = merge_partials(out_p, lse_p, out_s, lse_s)
  out = out.astype(q.dtype)
  return (out, lse) if return_lse else out


shared_prefix_attention_jit = jax.jit(shared_prefix_attention, static_argnames=("sm_scale", "return_lse"))
