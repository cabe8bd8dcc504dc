"""The one attention function every model layer calls; kernels and sequence parallelism plug in here."""

from __future__ import annotations

import pallas_kernels


def attention(q, k, v, *, q_positions, kv_positions, q_segment_ids, kv_segment_ids, sliding_window,
              implementation=None):
  """Causal attention, mask given by token positions and segment ids. Shapes as pallas_kernels.flash_attention."""
  return pallas_kernels.flash_attention(
      q, k, v, causal=True, q_positions=q_positions, kv_positions=kv_positions, q_segment_ids=q_segment_ids,
      kv_segment_ids=kv_segment_ids, sliding_window=sliding_window, implementation=implementation)
