"""The attention path of KV policies: paged attention masked by each slot's (layer, kv head) position.

A policy keeps, for every pool slot and every (layer, kv head), the position of the token held there
(PolicyState.slot_pos; -1: empty or evicted for that head). That is how per-head budgets are expressed in
one paged layout: every head of a layer shares the slot mapping and the page table, and a head that dropped
a token simply sees -1 at its slot. Key slot j (logical index into the sequence's page table) is visible
to a query at position p for (layer, head) when

    j < kv_len  and  0 <= pos_j <= p  and  (not a streaming head or pos_j < sinks or p - pos_j < window)

so masks follow the tokens (as everywhere in jaxinfer), whatever order compaction left the slots in. The
same pass returns the attention mass each slot received (summed over the query heads of its group and over
the rows the step weights), which SnapKV and H2O accumulate per request (PolicyState.score, by logical index).

positions="cache" (the StreamingLLM paper): keys are cached after RoPE at their original positions, so a
window key's distance to the query is already what the paper's within-cache positions give; only the sinks
must look closer, as if they sat just before the window: their scores use the query rotated back by
delta = max(0, p - window + 1 - sinks), which equals rotating those keys forward (RoPE is a rotation).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct
from jax.sharding import PartitionSpec as P

import pallas_kernels
from jaxinfer.engine import kv_quant
from jaxinfer.engine.kv_pool import store


@struct.dataclass
class PolicyState:
  """Device state of a KV policy (KVPool.policy)."""
  slot_pos: tuple  # per layer [num_slots, kv_heads] int32: position held by the slot for that head, -1: none
  score: tuple  # per layer [max_batch_size, table_slots, kv_heads] float32: mass per request row, logical slot

  @classmethod
  def create(cls, num_layers: int, num_slots: int, kv_heads: int, rows: int, table_slots: int):
    return cls(slot_pos=tuple(jnp.full((num_slots, kv_heads), -1, jnp.int32) for _ in range(num_layers)),
               score=tuple(jnp.zeros((rows, table_slots, kv_heads), jnp.float32) for _ in range(num_layers)))

  def copy_slots(self, src, dst) -> "PolicyState":
    """Slot dst[i] takes slot src[i]'s positions in every layer (KVPool.copy_pages; out-of-pool dst dropped).
    Scores are per request row and logical slot, not per pool slot: they do not move."""
    return self.replace(slot_pos=tuple(s.at[dst].set(s[src], mode="drop") for s in self.slot_pos))


# the kv-head axis of each per-layer array of the policy pass (its inputs by name, and PolicyState's fields):
# on a sharded model every one of them is split there (sharding.heads_spec)
STATE_HEAD_AXIS = {"slot_pos": 1, "score": 2}
HEAD_AXIS = dict(q=1, k=1, v=1, kp=2, vp=2, ks=2, vs=2, stream=0, **STATE_HEAD_AXIS)


@struct.dataclass
class PolicyStep:
  """What the attention path of one step needs beside the PagedKVCache's own fields."""
  state: PolicyState
  seq_slots: jax.Array  # [S] int32: request row of each sequence (its score row)
  weights: jax.Array  # [T] float32: how much each query row's attention counts in the score (0: not at all)
  reset: jax.Array  # [S] bool: zero the sequence's score row first (a request new to its row)


@dataclasses.dataclass(frozen=True)
class MaskRule:
  """Static part of a policy's attention (hashable: a jit key)."""
  sinks: int = 0
  window: int | None = None  # None: no streaming rule
  stream_heads: tuple | None = None  # per layer, per kv head: True where the streaming rule applies (None: all)
  cache_positions: bool = False
  inv_freq: tuple = ()  # RoPE inverse frequencies (cache positions)
  kernel_decode: bool = False  # decode-only steps: the paged kernel (nothing masked, nothing scored)
  scores: bool = False

  def streams(self, layer: int) -> np.ndarray | None:
    if self.window is None:
      return None
    return None if self.stream_heads is None else np.asarray(self.stream_heads[layer], bool)


def _rotate(x, angle_pos, inv_freq):
  """x [T, ..., d] rotated by RoPE at (signed) positions angle_pos [T]."""
  freqs = angle_pos.astype(jnp.float32)[:, None] * jnp.asarray(inv_freq, jnp.float32)[None, :]
  emb = jnp.concatenate([freqs, freqs], axis=-1)
  shape = (x.shape[0],) + (1,) * (x.ndim - 2) + (x.shape[-1],)
  cos, sin = jnp.cos(emb).reshape(shape), jnp.sin(emb).reshape(shape)
  half = x.shape[-1] // 2
  rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
  return x * cos + rotated * sin


def visibility(key_pos, q_pos, kv_len, rule: MaskRule, layer: int, sliding_window=None, stream_heads=None):
  """[T, L, H] bool: key slot l (holding key_pos [T, L, H]) visible to query row t at q_pos [T].
  stream_heads [H] bool: these H heads' streaming flags (one shard's); None: the rule's for the layer."""
  j = jnp.arange(key_pos.shape[1], dtype=jnp.int32)[None, :, None]
  p = q_pos[:, None, None]
  vis = (j < kv_len[:, None, None]) & (key_pos >= 0) & (key_pos <= p)
  if rule.window is not None:
    stream = (key_pos < rule.sinks) | (p - key_pos < rule.window)
    heads = rule.streams(layer) if stream_heads is None else stream_heads
    vis = vis & (stream if heads is None else (stream | ~jnp.asarray(heads)[None, None, :]))
  if sliding_window is not None:
    vis = vis & (p - key_pos < sliding_window)
  return vis


def masked_logits(q, k, key_pos, q_pos, vis, rule: MaskRule, layer: int, stream_heads=None):
  """(logits [T, H, G, L] float32, visible [T, H, 1, L]) of q [T, H*G, d] over keys k [T, L, H, d] under the
  policy's rule (the sinks seen from just before the window with cache positions)."""
  t, heads, d = q.shape
  h = k.shape[2]
  qg = q.astype(jnp.float32).reshape(t, h, heads // h, d)
  kf = k.astype(jnp.float32)
  scale = 1.0 / np.sqrt(d)
  s = jnp.einsum("thgd,tlhd->thgl", qg, kf) * scale
  if rule.cache_positions and rule.window is not None:
    delta = jnp.maximum(q_pos - rule.window + 1 - rule.sinks, 0)
    s_sink = jnp.einsum("thgd,tlhd->thgl", _rotate(qg, -delta, rule.inv_freq), kf) * scale
    sink = (key_pos < rule.sinks).transpose(0, 2, 1)[:, :, None, :]
    heads_mask = rule.streams(layer) if stream_heads is None else stream_heads
    if heads_mask is not None:
      sink = sink & jnp.asarray(heads_mask)[None, :, None, None]
    s = jnp.where(sink, s_sink, s)
  return s, vis.transpose(0, 2, 1)[:, :, None, :]


def masked_probs(q, k, key_pos, q_pos, vis, rule: MaskRule, layer: int, stream_heads=None):
  """Attention probabilities [T, H, G, L] float32 of q [T, H*G, d] over keys k [T, L, H, d] where vis
  (stream_heads: as in `visibility`)."""
  s, visible = masked_logits(q, k, key_pos, q_pos, vis, rule, layer, stream_heads)
  m = jnp.max(jnp.where(visible, s, -jnp.inf), axis=-1, keepdims=True)
  e = jnp.where(visible, jnp.exp(s - jnp.where(jnp.isfinite(m), m, 0.0)), 0.0)
  return e / jnp.maximum(e.sum(-1, keepdims=True), 1e-30)


def policy_attend(cache, layer: int, q, k, v, positions, sliding_window):
  """PagedKVCache.attend for a cache carrying a policy: writes k/v and slot positions, then attends.

  A quantized pool (cache.k_scales set) is written with kv_quant.store (quantize on write) and read as
  codes: the masked pass dequantizes only the pages it gathers for the step's sequences (gather_pages), the
  decode kernel dequantizes the tiles it loads; the pool is never converted whole.

  On a sharded model (cache.sharding) the whole pass runs per shard under shard_map: the pages, scales, slot
  positions and scores are split on kv heads like the pool (sharding.shard_policy_state), q on its heads,
  and every head's mask, scores and output depend on that head only, so each shard reads its own heads' pages
  and positions and returns its heads' mass; the step's metadata is replicated."""
  pol, rule = cache.policy, cache.policy_rule
  if hasattr(rule, "layer_attend"):  # a policy with a layout of its own (duo_store.py)
    return rule.layer_attend(cache, layer, q, k, v, positions, sliding_window)
  stream = rule.streams(layer)
  split = dict(q=q[0], k=k[0], v=v[0], kp=cache.k_pages[layer], vp=cache.v_pages[layer],
               slot_pos=pol.state.slot_pos[layer], score=pol.state.score[layer])
  if cache.k_scales is not None:
    split.update(ks=cache.k_scales[layer], vs=cache.v_scales[layer])
  if stream is not None:
    split.update(stream=jnp.asarray(stream))
  bare = cache.replace(k_pages=(), v_pages=(), k_scales=None, v_scales=None, policy=pol.replace(state=None))
  pos = positions[0].astype(jnp.int32)
  fn = lambda meta, p, arrays: _attend_local(meta, layer, p, sliding_window, **arrays)  # noqa: E731
  if cache.sharding is None:
    out, layer_kv = fn(bare, pos, split)
  else:
    specs = {name: cache.sharding.heads_spec(HEAD_AXIS[name]) for name in split}
    out_specs = (specs["q"], tuple(specs.get(n, P()) for n in ("kp", "vp", "slot_pos", "score", "ks", "vs")))
    out, layer_kv = jax.shard_map(fn, mesh=cache.sharding.mesh, in_specs=(P(), P(), specs), out_specs=out_specs,
                                  check_vma=False)(bare, pos, split)
  b, t, heads, d = q.shape
  return out.reshape(b, t, heads, d).astype(q.dtype), layer_kv


def _attend_local(cache, layer: int, pos, sliding_window, *, q, k, v, kp, vp, slot_pos, score, ks=None, vs=None,
                  stream=None):
  """The policy pass over the heads given (all of them, or one shard's): q [T, H*G, d], new k/v [T, H, d],
  this layer's pages / scales / slot positions / scores with H kv heads. -> (out [T, H*G, d],
  (kp, vp, slot_pos, score, ks, vs) updated)."""
  pol, rule = cache.policy, cache.policy_rule
  if ks is None:
    kp, vp = store(kp, vp, cache.slots, k, v)
  else:
    kp, vp, ks, vs = kv_quant.store(kp, vp, ks, vs, cache.slots, k, v)
  hkv = kp.shape[2]
  slot_pos = slot_pos.at[cache.slots].set(jnp.broadcast_to(pos[:, None], (pos.shape[0], hkv)), mode="drop")
  t, heads, d = q.shape
  if rule.kernel_decode and cache.decode_only:
    quant = {} if ks is None else dict(k_scales=ks, v_scales=vs)
    kq, vq = (kp.astype(q.dtype), vp.astype(q.dtype)) if ks is None else (kp, vp)
    out = pallas_kernels.paged_attention(q, kq, vq, cache.page_table, cache.kv_lens,
                                         sliding_window=sliding_window, implementation=cache.attention_impl,
                                         interpret=cache.interpret, **quant)
    return out, (kp, vp, slot_pos, score, ks, vs)
  if cache.group_table is not None:  # shared-prefix groups: their prefix once per group (shared_prefix.py)
    from jaxinfer.engine.kv_policies.shared_prefix import grouped_policy_attention

    out, score = grouped_policy_attention(cache, layer, pos, sliding_window, q=q, kp=kp, vp=vp, slot_pos=slot_pos,
                                          score=score, stream=stream)
    return out.reshape(t, heads, d), (kp, vp, slot_pos, score, ks, vs)
  from jaxinfer.engine.paged_cache import token_sequence

  ps, pt = kp.shape[1], cache.page_table
  s_pad, width = pt.shape
  seq, valid = token_sequence(cache.cu_q_lens, cache.num_seqs, t)
  kg = gather_pages(kp, ks, pt, seq)  # [T, L, H, d]
  vg = gather_pages(vp, vs, pt, seq)
  key_pos = slot_pos.reshape(-1, ps, hkv)[pt].reshape(s_pad, width * ps, hkv)[seq]  # [T, L, H]
  kv_len = jnp.where(valid, cache.kv_lens[seq], 0)
  vis = visibility(key_pos, pos, kv_len, rule, layer, sliding_window, stream_heads=stream)
  probs = masked_probs(q, kg, key_pos, pos, vis, rule, layer, stream_heads=stream)
  out = jnp.einsum("thgl,tlhd->thgd", probs, vg.astype(jnp.float32)).reshape(t, heads, d)
  if rule.scores:
    score = accumulate_scores(score, probs, seq, valid, pol, cache, width * ps)
  return out, (kp, vp, slot_pos, score, ks, vs)


def gather_pages(pages, scales, page_table, seq):
  """[T, L, H, d]: each query row's sequence pages (page_table [S, W] of pages [P, ps, H, d]) as L = W * ps
  slots. For a quantized pool the gathered pages are dequantized here with their own scales (per token
  [P, ps, H, 1] or per page and channel [P, 1, H, d], kv_quant.py), after the gather: only the step's pages."""
  s_pad, width = page_table.shape
  _, ps, hkv, d = pages.shape
  x = pages[page_table]  # [S, W, ps, H, d]
  if scales is not None:
    x = kv_quant.dequantize(x, scales[page_table])
  return x.reshape(s_pad, width * ps, hkv, d)[seq]


def accumulate_scores(score, probs, seq, valid, pol: PolicyStep, cache, table_slots: int):
  """score [rows, L, H] += per sequence, the attention mass its weighted rows gave each logical slot."""
  s_pad = cache.kv_lens.shape[0]
  mass = probs.sum(axis=2) * jnp.where(valid, pol.weights, 0.0)[:, None, None]  # [T, H, L]
  mass, table_slots = jnp.pad(mass, ((0, 0), (0, 0), (0, score.shape[1] - table_slots))), score.shape[1]  # narrow table
  per_seq = jax.ops.segment_sum(mass, seq, num_segments=s_pad).transpose(0, 2, 1)  # [S, L, H]
  q_len = cache.cu_q_lens[1:] - cache.cu_q_lens[:-1]
  j = jnp.arange(table_slots, dtype=jnp.int32)[None, :]
  new = (j >= (cache.kv_lens - q_len)[:, None]) & (j < cache.kv_lens[:, None])  # the new tokens' slots
  keep = jnp.where(pol.reset[:, None] | new, 0.0, 1.0)[:, :, None]
  return score.at[pol.seq_slots].multiply(keep).at[pol.seq_slots].add(per_seq)


def policy_finish(cache, layer_kvs):
  if hasattr(cache.policy_rule, "layer_finish"):  # a policy with a layout of its own (duo_store.py)
    return cache.policy_rule.layer_finish(cache, layer_kvs)
  state = PolicyState(slot_pos=tuple(kv[2] for kv in layer_kvs), score=tuple(kv[3] for kv in layer_kvs))
  scales = {}
  if cache.k_scales is not None:
    scales = dict(k_scales=tuple(kv[4] for kv in layer_kvs), v_scales=tuple(kv[5] for kv in layer_kvs))
  return cache.replace(k_pages=tuple(kv[0] for kv in layer_kvs), v_pages=tuple(kv[1] for kv in layer_kvs),
                       slots=None, policy=cache.policy.replace(state=state), **scales)
