"""PagedKVCache: the engine's KV cache, a pool of fixed-size pages shared by every sequence in flight.

It implements the model's cache protocol (see jaxinfer/models/kv_cache.py), so the Transformer runs on it
unchanged. One engine step feeds the model a ragged batch flattened into one row: tokens [1, max_tokens],
sequence s owning rows cu_q_lens[s]:cu_q_lens[s+1] (its newest tokens, positions kv_lens[s]-q_len .. kv_lens[s]-1).

  begin(positions, segment_ids)  -> the new tokens' slots: the engine sends them from the host (its slot
                                    mapping, as vLLM does); without one they are computed from the page table
                                    (page * page_size + offset); padding rows get an out-of-pool slot, dropped
  attend(layer, q, k, v, ...)    -> scatters this layer's new k/v into its pages, then
                                    pallas_kernels.ragged_paged_attention over the pages
  finish(layer_kvs, n)           -> the cache holding the updated pools

Attention reads token p of sequence s from page page_table[s, p // page_size] at offset p % page_size; writes
go wherever the slot mapping says (the engine's default mapping agrees with that layout).

Shared-prefix attention (Hydragen; when the step carries prefix groups): group g is a set of decode rows
(group_rows[g]) whose sequences hold the same physical pages group_table[g] at the start of their page tables,
group_lens[g] tokens. Their attention over that prefix is computed once per group as a batched matrix product
over all their queries (pallas_kernels.shared_prefix_attention.paged_prefix_attention, reading the prefix's
pages once); every sequence attends over its own remaining pages with ragged_paged_attention through a page
table shifted by seq_prefix_lens[s] // page_size (kv_lens reduced alike; 0 for sequences in no group, which
so take the normal path); the two partials are merged exactly by their log-sum-exps.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct

from jax.sharding import PartitionSpec as P

import pallas_kernels
from jaxinfer.engine import kv_quant
from jaxinfer.engine.kv_policies.attention import policy_attend, policy_finish
from jaxinfer.engine.kv_pool import KVPool, store
from jaxinfer.engine.sharding import per_shard, repeat_kv
from jaxinfer.engine.tree_attention import tree_rows_attention
from pallas_kernels.shared_prefix_attention import merge_partials, paged_prefix_attention


def token_sequence(cu_q_lens, num_seqs, num_tokens: int):
  """For each of num_tokens rows: (the sequence that owns it, whether it is a real token rather than padding)."""
  rows = jnp.arange(num_tokens, dtype=jnp.int32)
  max_seqs = cu_q_lens.shape[0] - 1
  seq = jnp.searchsorted(cu_q_lens[1:], rows, side="right").astype(jnp.int32)
  valid = rows < cu_q_lens[num_seqs]
  return jnp.clip(seq, 0, max_seqs - 1), valid


@struct.dataclass
class PagedKVCache:
  k_pages: tuple  # per layer [num_pages, page_size, kv_heads, head_dim]
  v_pages: tuple
  page_table: jax.Array  # [max_seqs, pages_per_seq] int32
  kv_lens: jax.Array  # [max_seqs] int32: tokens cached per sequence, this step's included
  cu_q_lens: jax.Array  # [max_seqs + 1] int32: row offsets of each sequence's new tokens
  num_seqs: jax.Array  # scalar int32: sequences in this step (the rest of the arrays are padding)
  slots: jax.Array | None = None  # [max_tokens] int32: flat pool slot of each new token (host slot mapping,
  # or computed by begin from the page table)
  # shared-prefix attention (all None: every sequence attends over its own pages only)
  group_rows: jax.Array | None = None  # [groups, max_seqs] int32: row of each member's decode token (pad: T)
  group_table: jax.Array | None = None  # [groups, pages_per_seq] int32: the group's prefix pages
  group_lens: jax.Array | None = None  # [groups] int32: prefix tokens (a page multiple; 0: unused group)
  seq_prefix_lens: jax.Array | None = None  # [max_seqs] int32: prefix tokens its group covers (0: none)
  # every sequence has exactly one new token at row s (a decode-only step): the decode kernel
  # (pallas_kernels.paged_attention, one query per sequence) replaces the ragged one
  decode_only: bool = struct.field(pytree_node=False, default=False)
  attention_impl: str | None = struct.field(pytree_node=False, default=None)
  prefix_impl: str | None = struct.field(pytree_node=False, default=None)
  interpret: bool = struct.field(pytree_node=False, default=False)
  # a sharded model (jaxinfer/engine/sharding.py EngineSharding): attention runs per shard under shard_map
  sharding: object = struct.field(pytree_node=False, default=None)
  # a quantized pool (int8 / float8_e4m3fn pages): per-layer float32 scales (jaxinfer/engine/kv_quant.py)
  k_scales: tuple | None = None
  v_scales: tuple | None = None
  # KV policy (jaxinfer/engine/kv_policies): slot positions per (layer, kv head), scores; None: no policy
  policy: object = None
  policy_rule: object = struct.field(pytree_node=False, default=None)
  # candidate trees (AttentionMetadata.tree_*): members' rows are recomputed with tree attention (None: none)
  tree_rows: jax.Array | None = None
  tree_seqs: jax.Array | None = None
  tree_ctx: jax.Array | None = None
  tree_mask: jax.Array | None = None
  num_tree_rows: jax.Array | None = None

  @staticmethod
  def create_pools(cfg, num_pages: int, page_size: int, dtype=None) -> tuple[tuple, tuple]:
    """Zeroed k and v pools, one [num_pages, page_size, kv_heads, head_dim] array per layer."""
    pool = KVPool.create(cfg, num_pages, page_size, dtype)
    return pool.k, pool.v

  @property
  def num_pages(self) -> int:
    return self.k_pages[0].shape[0]

  @property
  def page_size(self) -> int:
    return self.k_pages[0].shape[1]

  def begin(self, positions, segment_ids) -> "PagedKVCache":
    """Records where each new token goes. positions [1, max_tokens]; segment_ids are not needed (the
    sequence of a row follows from cu_q_lens). Slots sent by the host are kept as they are."""
    del segment_ids
    if positions.shape[0] != 1:
      raise ValueError(f"PagedKVCache takes the ragged batch flattened to one row, got batch {positions.shape[0]}")
    if self.slots is not None:
      return self
    pos = positions[0].astype(jnp.int32)
    seq, valid = token_sequence(self.cu_q_lens, self.num_seqs, pos.shape[0])
    ps = self.page_size
    page = self.page_table[seq, jnp.clip(pos // ps, 0, self.page_table.shape[1] - 1)]
    out_of_pool = self.num_pages * ps  # scatter with mode="drop" ignores it
    slots = jnp.where(valid, page * ps + pos % ps, out_of_pool).astype(jnp.int32)
    return self.replace(slots=slots)

  def attend(self, layer: int, q, k, v, *, positions, segment_ids, sliding_window, implementation):
    """Writes this layer's new k/v into the pool, then ragged paged attention over every sequence's pages.

    `implementation` (the model's flash-attention choice) does not apply here: the paged kernel's
    implementation is the engine's `attention_impl`."""
    del segment_ids, implementation
    if self.slots is None:
      raise RuntimeError("PagedKVCache.attend before begin")
    if self.policy is not None:  # a KV policy masks by slot positions (jaxinfer/engine/kv_policies/attention.py)
      return policy_attend(self, layer, q, k, v, positions, sliding_window)
    b, t, heads, d = q.shape
    k_new, v_new = repeat_kv(self.sharding, k[0]), repeat_kv(self.sharding, v[0])
    if self.k_scales is None:
      kp, vp = store(self.k_pages[layer], self.v_pages[layer], self.slots, k_new, v_new)
      kq, vq, scales, layer_kv = kp.astype(q.dtype), vp.astype(q.dtype), (), (kp, vp)
    else:  # quantize on write; the kernels dequantize the tiles they load (the pool is never converted whole)
      if self.group_table is not None:
        raise NotImplementedError("shared-prefix attention over a quantized KV pool (EngineConfig rejects it)")
      kp, vp, ks, vs = kv_quant.store(self.k_pages[layer], self.v_pages[layer], self.k_scales[layer],
                                      self.v_scales[layer], self.slots, k_new, v_new)
      kq, vq, scales, layer_kv = kp, vp, (ks, vs), (kp, vp, ks, vs)
    q0 = q[0]
    if self.sharding is None:
      out = self._attention(q0, kq, vq, positions[0], sliding_window, *scales)
    else:
      pool_spec = (self.sharding.pool_sharding().spec,) * len(scales)  # scales split on kv heads like pages
      bare = self.replace(k_pages=(), v_pages=(), k_scales=None, v_scales=None)  # nothing big closed over
      if self.group_table is None and self.decode_only:
        # decode rows are independent: split them over the data axis too
        rows = self.sharding.rows(q0.shape[0]) if q0.shape[0] == self.page_table.shape[0] else None
        meta = bare.replace(page_table=None, kv_lens=None)
        fn = lambda q_, k_, v_, m, table, lens, *sc: m.replace(page_table=table, kv_lens=lens)._attention(  # noqa: E731
            q_, k_, v_, None, sliding_window, *sc)
        out = per_shard(self.sharding, fn, q0, kq, vq, (meta, self.page_table, self.kv_lens, *scales),
                        (P(), P(rows), P(rows), *pool_spec), q_rows=rows)
      else:
        fn = lambda q_, k_, v_, m, pos, *sc: m._attention(q_, k_, v_, pos, sliding_window, *sc)  # noqa: E731
        out = per_shard(self.sharding, fn, q0, kq, vq, (bare, positions[0], *scales), (P(), P(), *pool_spec))
    return out.reshape(b, t, heads, d).astype(q.dtype), layer_kv

  def _attention(self, q, kp, vp, positions, sliding_window, k_scales=None, v_scales=None):
    """q [T, heads, d] over pages kp / vp (one shard's heads, or all of them): the step's kernel; with scales,
    kp / vp are quantized codes the kernel dequantizes tile by tile."""
    quant = {} if k_scales is None else dict(k_scales=k_scales, v_scales=v_scales)
    if self.group_table is None and self.decode_only:
      return pallas_kernels.paged_attention(
          q, kp, vp, self.page_table, self.kv_lens, sliding_window=sliding_window,
          implementation=self.attention_impl, interpret=self.interpret, **quant)
    if self.group_table is None:
      out = pallas_kernels.ragged_paged_attention(
          q, kp, vp, self.page_table, self.kv_lens, self.cu_q_lens, self.num_seqs, sliding_window=sliding_window,
          implementation=self.attention_impl, interpret=self.interpret, **quant)
    else:
      out = self._shared_prefix_attend(q, kp, vp, positions, sliding_window)
    return out if self.tree_rows is None else self._tree_attend(out, q, kp, vp)

  def _tree_attend(self, out, q, kp, vp):
    """The rows of candidate trees, again: each member sees its sequence's cached context and its ancestors
    only (the causal pass above let it see its siblings too); their k/v were written this step at the slots
    the host mapped them to, so they are read back from the pages."""
    t = q.shape[0]
    rows = jnp.clip(self.tree_rows, 0, t - 1)
    flat = (kp.shape[0] * kp.shape[1],) + kp.shape[2:]
    own = jnp.clip(self.slots[rows], 0, flat[0] - 1)
    tree_out = tree_rows_attention(q[rows], kp.reshape(flat)[own], vp.reshape(flat)[own], self.tree_mask, kp, vp,
                                   self.page_table[self.tree_seqs], self.tree_ctx, self.num_tree_rows,
                                   implementation=self.attention_impl, interpret=self.interpret)
    return out.at[self.tree_rows].set(tree_out.astype(out.dtype), mode="drop")

  def _shared_prefix_attend(self, q, kp, vp, positions, sliding_window):
    """q [T, heads, d] -> [T, heads, d]: prefix part once per group + each sequence's suffix, lse-merged."""
    t = q.shape[0]
    ps, pps = kp.shape[1], self.page_table.shape[1]
    shift = self.seq_prefix_lens // ps  # [S] pages each sequence's group covers
    cols = jnp.clip(jnp.arange(pps, dtype=jnp.int32)[None, :] + shift[:, None], 0, pps - 1)
    suffix_table = jnp.take_along_axis(self.page_table, cols, axis=1)
    out_s, lse_s = pallas_kernels.ragged_paged_attention(
        q, kp, vp, suffix_table, self.kv_lens - self.seq_prefix_lens, self.cu_q_lens, self.num_seqs,
        sliding_window=sliding_window, return_lse=True, implementation=self.attention_impl,
        interpret=self.interpret)
    rows = jnp.clip(self.group_rows, 0, t - 1)  # padding members compute something nobody keeps
    out_p, lse_p = paged_prefix_attention(q[rows], kp, vp, self.group_table, self.group_lens,
                                          q_positions=positions[rows].astype(jnp.int32),
                                          sliding_window=sliding_window, implementation=self.prefix_impl)
    flat_rows = self.group_rows.reshape(-1)
    out_pt = jnp.zeros(q.shape, jnp.float32).at[flat_rows].set(out_p.reshape(-1, *q.shape[1:]), mode="drop")
    lse_pt = jnp.full(q.shape[:2], -jnp.inf, jnp.float32).at[flat_rows].set(lse_p.reshape(-1, q.shape[1]),
                                                                             mode="drop")
    out, _ = merge_partials(out_pt, lse_pt, out_s, lse_s)
    return out

  def finish(self, layer_kvs, num_tokens: int) -> "PagedKVCache":
    del num_tokens
    if self.policy is not None:
      return policy_finish(self, layer_kvs)
    scales = {}
    if self.k_scales is not None:
      scales = dict(k_scales=tuple(kv[2] for kv in layer_kvs), v_scales=tuple(kv[3] for kv in layer_kvs))
    return self.replace(k_pages=tuple(kv[0] for kv in layer_kvs), v_pages=tuple(kv[1] for kv in layer_kvs),
                        slots=None, **scales)
