"""Which (q_block, kv_block) tiles of the score matrix can hold a visible pair: the block-sparse skip logic.

Every blockwise implementation (xla, pallas_gpu, pallas_tpu) decides per tile whether to compute it from the
per-block min/max of the token positions and segment ids, so causal, sliding-window and packed-segment masks
skip the tiles they hide entirely, whatever the layout of the tokens (contiguous, striped, chunked prefill).
The test is conservative: a tile is marked visible when *some* pair inside it may be visible; the per-element
predicate in `masks.visible` still masks inside the tiles that are computed.

`tile_visibility` is public (ring attention counts computed tiles with it); `block_lists` turns the visibility
into the compacted per-row lists of tile indices the kernels iterate over.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

_INT32_MAX = np.iinfo(np.int32).max
_INT32_MIN = np.iinfo(np.int32).min


def _cdiv(a: int, b: int) -> int:
  return -(-a // b)


def _block_min_max(x, block: int):
  """x [batch, length] int32 -> (min, max) each [batch, num_blocks]; a ragged last block ignores its padding."""
  batch, length = x.shape
  n = _cdiv(length, block)
  pad = n * block - length
  lo = jnp.pad(x, ((0, 0), (0, pad)), constant_values=_INT32_MAX).reshape(batch, n, block).min(-1)
  hi = jnp.pad(x, ((0, 0), (0, pad)), constant_values=_INT32_MIN).reshape(batch, n, block).max(-1)
  return lo, hi


def tile_visibility(q_positions, kv_positions, q_segment_ids, kv_segment_ids, *, causal: bool,
                    sliding_window, block_q: int, block_k: int):
  """Boolean [batch, num_q_blocks, num_kv_blocks]: True where the tile may contain a visible (query, key) pair.

  Args:
    q_positions: int32 [batch, q_len] token positions of the queries (None: arange(q_len)).
    kv_positions: int32 [batch, kv_len] token positions of the keys (None: arange(kv_len)).
    q_segment_ids, kv_segment_ids: int32 [batch, len] packing segment ids, both or neither (None).
    causal, sliding_window: as in `flash_attention` (key j visible to query i iff kv_pos[j] <= q_pos[i] when
      causal, q_pos[i] - kv_pos[j] < sliding_window when a window is given, and the segments are equal).
    block_q, block_k: tile sizes; lengths need not be multiples (the last block is ragged).

  Conservative per constraint: causal needs min(kv_pos) <= max(q_pos), the window needs
  min(q_pos) - max(kv_pos) < window, and segments need overlapping [min, max] segment-id ranges (exact for
  sorted packed segments).
  """
  if block_q <= 0 or block_k <= 0:
    raise ValueError(f"block_q and block_k must be positive, got block_q={block_q}, block_k={block_k}")
  if (q_segment_ids is None) != (kv_segment_ids is None):
    raise ValueError("q_segment_ids and kv_segment_ids must be given together (both or neither)")
  ref_q = q_positions if q_positions is not None else q_segment_ids
  ref_k = kv_positions if kv_positions is not None else kv_segment_ids
  if ref_q is None or ref_k is None:
    raise ValueError("tile_visibility needs q_positions or q_segment_ids, and kv_positions or kv_segment_ids, "
                     "to know the batch and the lengths")
  batch, q_len = ref_q.shape
  kv_len = ref_k.shape[1]
  if q_positions is None:
    q_positions = jnp.broadcast_to(jnp.arange(q_len, dtype=jnp.int32), (batch, q_len))
  if kv_positions is None:
    kv_positions = jnp.broadcast_to(jnp.arange(kv_len, dtype=jnp.int32), (batch, kv_len))
  q_positions = jnp.asarray(q_positions, jnp.int32)
  kv_positions = jnp.asarray(kv_positions, jnp.int32)

  nq, nk = _cdiv(q_len, block_q), _cdiv(kv_len, block_k)
  vis = jnp.ones((batch, nq, nk), dtype=bool)
  if causal or sliding_window is not None:
    q_lo, q_hi = _block_min_max(q_positions, block_q)
    k_lo, k_hi = _block_min_max(kv_positions, block_k)
    if causal:
      vis = vis & (k_lo[:, None, :] <= q_hi[:, :, None])
    if sliding_window is not None:
      vis = vis & ((q_lo[:, :, None] - k_hi[:, None, :]) < sliding_window)
  if q_segment_ids is not None:
    qs_lo, qs_hi = _block_min_max(jnp.asarray(q_segment_ids, jnp.int32), block_q)
    ks_lo, ks_hi = _block_min_max(jnp.asarray(kv_segment_ids, jnp.int32), block_k)
    vis = vis & (qs_lo[:, :, None] <= ks_hi[:, None, :]) & (ks_lo[:, None, :] <= qs_hi[:, :, None])
  return vis


def block_lists(vis):
  """Compacts visibility [..., rows, cols] into per-row lists of visible column indices.

  Returns (indices int32 [..., rows, cols], counts int32 [..., rows]): the first `counts` entries of a row are
  its visible columns in ascending order; the remaining entries repeat the last visible one (0 when none), so
  a pipelined kernel that keeps iterating fetches no new block for them.
  """
  n = vis.shape[-1]
  counts = vis.sum(-1, dtype=jnp.int32)
  order = jnp.argsort(jnp.logical_not(vis).astype(jnp.int32), axis=-1, stable=True).astype(jnp.int32)
  last = jnp.take_along_axis(order, jnp.maximum(counts - 1, 0)[..., None], axis=-1)
  step = jnp.arange(n, dtype=jnp.int32)
  indices = jnp.where(step < counts[..., None], order, last)
  return indices, counts
