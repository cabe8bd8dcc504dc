"""A KV policy's attention pass in a step that carries shared-prefix (Hydragen) groups.

The scheduler puts a sequence in a group only while its policy's view of it is the plain causal view over
its pages (EvictionPolicy.plain_view): nothing evicted, moved or re-rotated, no score weight on its rows, and
its first pages the prefix-cache pages the group shares. So for a grouped row the prefix part is plain
attention over the group's pages, computed once per group (paged_prefix_attention, as PagedKVCache does
without a policy), and the rest is the policy's masked pass over the pages after the prefix (the page table
shifted by seq_prefix_lens // page_size, kv_len reduced alike, key positions read from PolicyState.slot_pos
as always). Rows in no group have seq_prefix_lens 0: their masked pass covers every page, their prefix part
is empty (lse -inf) and the merge returns their pass's output unchanged, so they go through the policy's own
attention in the same step. The two partials are merged exactly by their log-sum-exps.

Cost: the suffix pass still gathers the full page-table width per row (static shapes; the shift only moves
which pages it reads), so on top of the policy's own pass the prefix part is extra work until the suffix
table gets a narrower static width (docs/kv_compression.md, "KV policies with shared-prefix attention").

Scores: a grouped row carries weight 0 (plain_view guarantees it and BatchBuilder checks it), so the mass
accumulated is that of ungrouped rows only, whose probabilities are over all their visible keys (no prefix
part). Scoring sequences (H2O) are therefore kept out of groups rather than scored through the prefix part.
"""

from __future__ import annotations

import jax.numpy as jnp

from jaxinfer.engine.kv_policies.attention import accumulate_scores, gather_pages, masked_logits, visibility
from pallas_kernels.shared_prefix_attention import merge_partials, paged_prefix_attention


def masked_attention_lse(q, k, v, key_pos, q_pos, vis, rule, layer: int, stream_heads=None):
  """(out [T, H*G, d] float32, lse [T, H*G] float32, probs [T, H, G, L]) of q [T, H*G, d] over keys and values
  [T, L, H, d] where vis [T, L, H]; the same logits and normalisation as attention.masked_probs (lse -inf
  and out 0 for a row that sees nothing)."""
  t, heads, d = q.shape
  s, visible = masked_logits(q, k, key_pos, q_pos, vis, rule, layer, stream_heads)
  m = jnp.max(jnp.where(visible, s, -jnp.inf), axis=-1, keepdims=True)
  m0 = jnp.where(jnp.isfinite(m), m, 0.0)
  e = jnp.where(visible, jnp.exp(s - m0), 0.0)
  total = e.sum(-1, keepdims=True)
  probs = e / jnp.maximum(total, 1e-30)
  out = jnp.einsum("thgl,tlhd->thgd", probs, v.astype(jnp.float32)).reshape(t, heads, d)
  lse = jnp.where(total > 0, m0 + jnp.log(jnp.maximum(total, 1e-30)), -jnp.inf)[..., 0].reshape(t, heads)
  return out, lse, probs


def grouped_policy_attention(cache, layer: int, pos, sliding_window, *, q, kp, vp, slot_pos, score,
                             stream=None):
  """q [T, H*G, d] over this layer's float pages kp / vp (the new k/v already stored, slot_pos updated) in a
  step with prefix groups -> (out [T, H*G, d] float32, score updated)."""
  from jaxinfer.engine.paged_cache import token_sequence

  pol, rule = cache.policy, cache.policy_rule
  t = q.shape[0]
  ps, hkv = kp.shape[1], kp.shape[2]
  pt = cache.page_table
  s_pad, width = pt.shape
  kq, vq = kp.astype(q.dtype), vp.astype(q.dtype)
  # the suffix part: each sequence's pages after its group's prefix (the whole table for rows in no group)
  shift = cache.seq_prefix_lens // ps
  cols = jnp.clip(jnp.arange(width, dtype=jnp.int32)[None, :] + shift[:, None], 0, width - 1)
  suffix_table = jnp.take_along_axis(pt, cols, axis=1)
  suffix_lens = cache.kv_lens - cache.seq_prefix_lens
  seq, valid = token_sequence(cache.cu_q_lens, cache.num_seqs, t)
  key_pos = slot_pos.reshape(-1, ps, hkv)[suffix_table].reshape(s_pad, width * ps, hkv)[seq]
  kv_len = jnp.where(valid, suffix_lens[seq], 0)
  vis = visibility(key_pos, pos, kv_len, rule, layer, sliding_window, stream_heads=stream)
  kg = gather_pages(kp, None, suffix_table, seq)  # [T, L, H, d]
  vg = gather_pages(vp, None, suffix_table, seq)
  out_s, lse_s, probs = masked_attention_lse(q, kg, vg, key_pos, pos, vis, rule, layer, stream_heads=stream)
  if rule.scores:  # grouped rows weigh 0: only ungrouped rows (shift 0, logical slots as is) add mass
    score = accumulate_scores(score, probs, seq, valid, pol, cache, width * ps)
  # the prefix part: once per group over its prefix-cache pages, plain causal (the members' view)
  rows = jnp.clip(cache.group_rows, 0, t - 1)  # padding members compute something nobody keeps
  out_p, lse_p = paged_prefix_attention(q[rows], kq, vq, cache.group_table, cache.group_lens,
                                        q_positions=pos[rows], sliding_window=sliding_window,
                                        implementation=cache.prefix_impl)
  flat = cache.group_rows.reshape(-1)
  out_pt = jnp.zeros(out_s.shape, jnp.float32).at[flat].set(out_p.reshape(-1, *q.shape[1:]), mode="drop")
  lse_pt = jnp.full(lse_s.shape, -jnp.inf, jnp.float32).at[flat].set(lse_p.reshape(-1, q.shape[1]), mode="drop")
  out, _ = merge_partials(out_pt, lse_pt, out_s, lse_s)
  return out, score

