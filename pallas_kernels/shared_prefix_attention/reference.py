"""Reference: every sequence attends to its own copy of prefix + suffix (the baseline Hydragen removes)."""

from __future__ import annotations

import jax.numpy as jnp

from pallas_kernels import decode_common as C
from pallas_kernels.flash_attention.reference import attention_reference
from pallas_kernels.op import always_available
from pallas_kernels.pages import gather_pages

unavailable_reason = always_available


def shared_prefix_attention_reference(q, prefix_k, prefix_v, suffix_k, suffix_v, suffix_lens, *, sm_scale=None,
                                      return_lse=False):
  batch = q.shape[0]
  prefix_len, max_suffix = prefix_k.shape[0], suffix_k.shape[1]
  k = jnp.concatenate([jnp.broadcast_to(prefix_k, (batch, *prefix_k.shape)), suffix_k], axis=1)
  v = jnp.concatenate([jnp.broadcast_to(prefix_v, (batch, *prefix_v.shape)), suffix_v], axis=1)
  kv_len = prefix_len + max_suffix
  # The decode token is the last valid one: position prefix_len + suffix_len - 1; invalid suffix slots get
  # a segment id of their own so nothing sees them.
  slot = jnp.arange(kv_len, dtype=jnp.int32)[None, :]
  valid = slot < (prefix_len + suffix_lens)[:, None]
  kv_segments = jnp.where(valid, 0, 1).astype(jnp.int32)
  q_positions = (prefix_len + suffix_lens - 1)[:, None].astype(jnp.int32)
  out, lse = attention_reference(q[:, None], k, v, causal=True, sm_scale=sm_scale, q_positions=q_positions,
                                 kv_positions=jnp.broadcast_to(slot, (batch, kv_len)),
                                 q_segment_ids=jnp.zeros((batch, 1), jnp.int32), kv_segment_ids=kv_segments,
                                 return_lse=True)
  out = out[:, 0]
  return (out, lse[:, :, 0]) if return_lse else out


def paged_prefix_attention_reference(q, k_pages, v_pages, prefix_page_table, prefix_lens, *, q_positions=None,
                                     sliding_window=None, sm_scale=None):
  """Each group's queries against its whole prefix, gathered to a contiguous copy and masked densely."""
  params = C.score_params(q.shape[-1], sm_scale, sliding_window, None)
  k = gather_pages(k_pages, prefix_page_table)  # [G, max_pages * page_size, kv_heads, d]
  v = gather_pages(v_pages, prefix_page_table)
  groups, rows = q.shape[:2]
  j = jnp.arange(k.shape[1], dtype=jnp.int32)
  mask = j[None, None, :] < jnp.clip(prefix_lens, 0, k.shape[1])[:, None, None].astype(jnp.int32)
  mask = jnp.broadcast_to(mask, (groups, rows, k.shape[1]))
  if params.sliding_window is not None:
    mask = mask & (q_positions[:, :, None] - j[None, None, :] < params.sliding_window)
  return C.masked_attention(q, k, v, mask, params)


# the op's entry names (pallas_kernels.shared_prefix_attention.api.OP)
shared_prefix_attention = shared_prefix_attention_reference
paged_prefix_attention = paged_prefix_attention_reference
