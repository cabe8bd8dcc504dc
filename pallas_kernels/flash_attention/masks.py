"""The one definition of which keys a query may see, shared by every implementation."""

from __future__ import annotations

import jax.numpy as jnp


def default_positions(batch: int, length: int):
  return jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (batch, length))


def visible(q_pos, kv_pos, q_seg, kv_seg, *, causal: bool, sliding_window):
  """Broadcasting predicate: key j is visible to query i (arguments already shaped to broadcast)."""
  ok = q_seg == kv_seg
  if causal:
    ok = ok & (kv_pos <= q_pos)
  if sliding_window is not None:
    ok = ok & (q_pos - kv_pos < sliding_window)
  return ok


def visible_mask(batch, q_len, kv_len, *, causal, q_positions=None, kv_positions=None,
                 q_segment_ids=None, kv_segment_ids=None, sliding_window=None):
  """Boolean [batch, q_len, kv_len] mask."""
  qp = default_positions(batch, q_len) if q_positions is None else q_positions
  kp = default_positions(batch, kv_len) if kv_positions is None else kv_positions
  qs = jnp.zeros((batch, q_len), jnp.int32) if q_segment_ids is None else q_segment_ids
  ks = jnp.zeros((batch, kv_len), jnp.int32) if kv_segment_ids is None else kv_segment_ids
  return visible(qp[:, :, None], kp[:, None, :], qs[:, :, None], ks[:, None, :],
                 causal=causal, sliding_window=sliding_window)
