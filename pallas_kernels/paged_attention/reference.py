"""Plain-jnp paged attention in float32: gather each sequence's pages into a contiguous cache, mask, and run
the dense core decode_common.masked_attention. Obviously correct, memory-hungry (one contiguous copy of a
sequence's whole cache per query token for the ragged op): for tests only. A quantized pool is dequantized
in float32 on the gathered copy (each sequence's pages), never as a whole pool."""

from __future__ import annotations

import jax.numpy as jnp

from pallas_kernels import decode_common as C
from pallas_kernels.decode_common import decode_mask, masked_attention
from pallas_kernels.op import always_available
from pallas_kernels.pages import gather_pages
from pallas_kernels.paged_attention import _quant as Q

NAME = "reference"


unavailable_reason = always_available


def gather_real(pages, scales, page_table):
  """Each row's pages as a contiguous cache of real values [n, pages_per_seq * page_size, kv_heads, d]
  (float32 when quantized, else the pool's dtype)."""
  if scales is None:
    return gather_pages(pages, page_table)
  lay = Q.layout(pages, scales, "scales")
  phys = jnp.clip(jnp.asarray(page_table, jnp.int32), 0, pages.shape[0] - 1)
  n, pps = phys.shape
  return Q.dequant_pages(pages, scales, lay, phys, jnp.float32).reshape(n, pps * pages.shape[1], *pages.shape[2:])


def paged_attention(q, k_pages, v_pages, page_table, kv_lens, *, sm_scale=None, sliding_window=None,
                    logits_soft_cap=None, num_splits=None, return_lse=False, interpret=False, k_scales=None,
                    v_scales=None):
  del num_splits, interpret
  params = C.score_params(q.shape[-1], sm_scale, sliding_window, logits_soft_cap)
  k = gather_real(k_pages, k_scales, page_table)
  v = gather_real(v_pages, v_scales, page_table)
  mask = decode_mask(kv_lens, k.shape[1], params.sliding_window)
  out, lse = masked_attention(q[:, None], k, v, mask[:, None, :], params)
  out = out[:, 0].astype(q.dtype)
  return (out, lse[:, 0]) if return_lse else out


def token_metadata(kv_lens, cu_q_lens, num_seqs, max_tokens: int, capacity: int):
  """For every query row: (sequence index, position, valid). Row t belongs to the sequence s with
  cu_q_lens[s] <= t < cu_q_lens[s+1], s < num_seqs; its position is kv_lens[s] - q_len_s + (t - cu_q_lens[s])."""
  max_seqs = kv_lens.shape[0]
  num_seqs = jnp.clip(jnp.asarray(num_seqs, jnp.int32).reshape(()), 0, max_seqs)
  cu = C.int32(cu_q_lens)
  t = jnp.arange(max_tokens, dtype=jnp.int32)
  s_idx = jnp.arange(max_seqs, dtype=jnp.int32)
  owner = (cu[None, :-1] <= t[:, None]) & (t[:, None] < cu[None, 1:]) & (s_idx[None, :] < num_seqs)  # [T, S]
  valid = owner.any(axis=1)
  seq = jnp.argmax(owner, axis=1).astype(jnp.int32)
  kv_len = jnp.clip(C.int32(kv_lens), 0, capacity)
  q_len = cu[1:] - cu[:-1]
  pos = kv_len[seq] - q_len[seq] + (t - cu[seq])
  return seq, pos, valid


def ragged_paged_attention(q, k_pages, v_pages, page_table, kv_lens, cu_q_lens, num_seqs, *, sm_scale=None,
                           sliding_window=None, logits_soft_cap=None, return_lse=False, interpret=False,
                           k_scales=None, v_scales=None):
  del interpret
  params = C.score_params(q.shape[-1], sm_scale, sliding_window, logits_soft_cap)
  k = gather_real(k_pages, k_scales, page_table)  # [S, L, hkv, d]
  v = gather_real(v_pages, v_scales, page_table)
  capacity = k.shape[1]
  seq, pos, valid = token_metadata(kv_lens, cu_q_lens, num_seqs, q.shape[0], capacity)
  kv_len = jnp.clip(C.int32(kv_lens), 0, capacity)[seq]
  j = jnp.arange(capacity, dtype=jnp.int32)[None, :]
  mask = valid[:, None] & (j < kv_len[:, None]) & (j <= pos[:, None])
  if params.sliding_window is not None:
    mask = mask & (pos[:, None] - j < params.sliding_window)
  out, lse = masked_attention(q[:, None], k[seq], v[seq], mask[:, None, :], params)
  out = out[:, 0].astype(q.dtype)
  return (out, lse[:, 0]) if return_lse else out
