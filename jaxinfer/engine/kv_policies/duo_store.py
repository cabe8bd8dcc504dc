"""The realised DuoAttention layout (policy "duo"): retrieval KV heads in the paged pool, streaming KV heads
in a fixed per-request-row store of sinks + window slots.

Per layer l the pool's pages hold only that layer's R_l retrieval KV heads ([num_pages, page_size, R_l, d];
KVPool.create(layer_kv_heads=...)), so a page costs R_l / num_kv_heads of a full one. The S_l streaming KV
heads of layer l live in DuoState.store_k / store_v [max_batch_size, sinks + window, S_l, d]: slot p < sinks
holds sink p; slot sinks + (p - sinks) % window is a ring for the window; store_pos [rows, sinks + window]
the position each slot holds (-1: empty), so masks follow the tokens. Nothing of a streaming head grows with
the sequence.

One layer of one step:
  retrieval heads  their k/v are written into the pages, then the engine's paged kernels (ragged or decode)
                   attend over every cached token, unmasked (the kernels' own causal rule)
  streaming heads  the queries attend densely over the store's old entries AND the step's own new k/v of
                   the same sequence, under the sinks + window rule; only then is the chunk written into the
                   store (per sequence its sinks and its last `window` tokens), so a chunk longer than the
                   window never overwrites a key its earlier queries still need
Query heads are grouped by kv head (head h * G + g reads kv head h); the two groups' outputs go back into
head order. A quantized pool (int8 / float8_e4m3fn): the pages are written with kv_quant.store and read by
the kernels with their scales; the store holds codes with a scale per token and head (DuoState.store_ks /
store_vs), and the chunk's own k/v are attended as the store will give them back (kv_quant.roundtrip).
A sequence new to its row (PolicyStep.reset: admitted, or re-admitted after preemption) empties its row
first. Prefix caching cannot name duo pages (their streaming heads' k/v are not in them): the policy's
register_limit is 0. On a sharded model the pass runs per shard (duo_attend).

positions="cache" (StreamingLLM's within-cache positions): the streaming heads' sink keys score against the
query rotated back by max(0, p - window + 1 - sinks), as in attention.py.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from jaxinfer.engine import kv_quant
from jaxinfer.engine.kv_policies.attention import MaskRule, _rotate
from jaxinfer.engine.kv_pool import store


@struct.dataclass
class DuoState:
  """Device state of the realised duo layout (KVPool.policy)."""
  store_k: tuple  # per layer [rows, sinks + window, S_l, d]
  store_v: tuple
  store_pos: tuple  # per layer [rows, sinks + window] int32: position held by the slot, -1: none
  store_ks: tuple | None = None  # quantized store: per layer [rows, sinks + window, S_l, 1] float32 scales
  store_vs: tuple | None = None

  @classmethod
  def create(cls, stream_heads: tuple, rows: int, slots: int, head_dim: int, dtype):
    """dtype int8 / float8_e4m3fn: codes with a scale per token and head (kv_quant's per-token layout)."""
    from jaxinfer.engine.kv_quant import QMAX

    kv = lambda d, dt: tuple(jnp.zeros((rows, slots, len(s), d), dt) for s in stream_heads)  # noqa: E731
    scales = {}
    if jnp.dtype(dtype).name in QMAX:
      scales = dict(store_ks=kv(1, jnp.float32), store_vs=kv(1, jnp.float32))
    return cls(store_k=kv(head_dim, dtype), store_v=kv(head_dim, dtype),
               store_pos=tuple(jnp.full((rows, slots), -1, jnp.int32) for _ in stream_heads), **scales)

  def shard(self, sharding) -> "DuoState":
    """The state split on kv heads like the pool (store_pos replicated): each device keeps its heads' store."""
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    heads = NamedSharding(sharding.mesh, sharding.heads_spec(2))
    put = lambda xs: None if xs is None else tuple(jax.device_put(x, heads) for x in xs)  # noqa: E731
    return DuoState(store_k=put(self.store_k), store_v=put(self.store_v), store_ks=put(self.store_ks),
                    store_vs=put(self.store_vs),
                    store_pos=tuple(jax.device_put(x, NamedSharding(sharding.mesh, P())) for x in self.store_pos))

  def copy_slots(self, src, dst) -> "DuoState":
    """KVPool.copy_pages (prefix-cache copy-on-write) never reaches duo: its pages are never named (the
    streaming heads' k/v are not in them), so a copy would be a bug upstream, not something to carry out."""
    raise RuntimeError("copy of pages under the realised duo layout: duo pages are never shared")

  @property
  def nbytes(self) -> int:
    arrays = self.store_k + self.store_v + self.store_pos + (self.store_ks or ()) + (self.store_vs or ())
    return int(sum(a.nbytes for a in arrays))


@dataclasses.dataclass(frozen=True)
class DuoRule(MaskRule):
  """MaskRule (sinks, window, cache positions) plus the per-layer head split (static: a jit key)."""
  retrieval: tuple = ()  # per layer: the retrieval kv heads (pool order)
  streaming: tuple = ()  # per layer: the streaming kv heads (store order)
  group: int = 1  # query heads per kv head

  def layer_attend(self, cache, layer, q, k, v, positions, sliding_window):
    return duo_attend(self, cache, layer, q, k, v, positions, sliding_window)

  def layer_finish(self, cache, layer_kvs):
    field = lambda i: tuple(kv[i] for kv in layer_kvs)  # noqa: E731
    quant = cache.policy.state.store_ks is not None
    state = DuoState(store_k=field(2), store_v=field(3), store_pos=field(4),
                     store_ks=field(5) if quant else None, store_vs=field(6) if quant else None)
    scales = {} if cache.k_scales is None else dict(k_scales=field(7), v_scales=field(8))
    return cache.replace(k_pages=field(0), v_pages=field(1), slots=None,
                         policy=cache.policy.replace(state=state), **scales)


def _query_heads(kv_heads, group: int):
  """Query heads (h * group + g) of kv heads [n] (a NumPy or traced array) -> [n * group]."""
  return (kv_heads[:, None] * group + jnp.arange(group, dtype=jnp.int32)[None, :]).reshape(-1)


# the kv-head axis of each per-layer input of the pass (sharded models split every one there; store_pos and
# the step's metadata are replicated: every shard writes the same positions)
HEAD_AXIS = dict(q=1, k=1, v=1, kp=2, vp=2, ks=2, vs=2, sk=2, sv=2, sks=2, svs=2, ret=0, strm=0)


def duo_attend(rule: DuoRule, cache, layer: int, q, k, v, positions, sliding_window):
  """PagedKVCache.attend under the realised duo layout -> (out [1, T, heads, d], layer state).

  On a sharded model the pass runs per shard under shard_map: each shard holds an equal share of the layer's
  retrieval and streaming heads (DuoPolicy.layer_kv_heads checks it), so its pages, store and q heads are its
  own; the head indices go in as arrays split like the heads (each shard's indices within its block)."""
  st = cache.policy.state
  kv_heads = len(rule.retrieval[layer]) + len(rule.streaming[layer])
  tp = 1 if cache.sharding is None else _head_shards(cache.sharding)
  local = kv_heads // tp  # kv heads per shard: index h of the model is h % local on its shard
  arrays = dict(q=q[0], k=k[0], v=v[0], kp=cache.k_pages[layer], vp=cache.v_pages[layer],
                sk=st.store_k[layer], sv=st.store_v[layer],
                ret=jnp.asarray(np.asarray(rule.retrieval[layer], np.int32) % local, jnp.int32),
                strm=jnp.asarray(np.asarray(rule.streaming[layer], np.int32) % local, jnp.int32))
  if cache.k_scales is not None:
    arrays.update(ks=cache.k_scales[layer], vs=cache.v_scales[layer])
  if st.store_ks is not None:
    arrays.update(sks=st.store_ks[layer], svs=st.store_vs[layer])
  bare = cache.replace(k_pages=(), v_pages=(), k_scales=None, v_scales=None,
                       policy=cache.policy.replace(state=None))
  pos = positions[0].astype(jnp.int32)
  has = (bool(rule.retrieval[layer]), bool(rule.streaming[layer]))
  fn = lambda meta, p, sp, a: _attend_local(rule, has, meta, p, sp, sliding_window, **a)  # noqa: E731
  names = ("kp", "vp", "sk", "sv", "sp", "sks", "svs", "ks", "vs")
  if cache.sharding is None:
    out, layer_kv = fn(bare, pos, st.store_pos[layer], arrays)
  else:
    from jax.sharding import PartitionSpec as P

    specs = {name: cache.sharding.heads_spec(HEAD_AXIS[name]) for name in arrays}
    out_specs = (specs["q"], tuple(specs.get(n, P()) for n in names))
    out, layer_kv = jax.shard_map(fn, mesh=cache.sharding.mesh, in_specs=(P(), P(), P(), specs),
                                  out_specs=out_specs, check_vma=False)(bare, pos, st.store_pos[layer], arrays)
  b, t, heads, d = q.shape
  return out.reshape(b, t, heads, d).astype(q.dtype), layer_kv


def _head_shards(sharding) -> int:
  n = 1
  for a in sharding.head_axes:
    n *= sharding.mesh.shape[a]
  return n


def _attend_local(rule: DuoRule, has, cache, pos, sp, sliding_window, *, q, k, v, kp, vp, sk, sv, ret, strm,
                  ks=None, vs=None, sks=None, svs=None):
  """The pass over the heads given (all, or one shard's): q [T, H*G, d], new k/v [T, H, d]; ret / strm the
  retrieval / streaming kv heads among these H. -> (out [T, H*G, d], the layer's updated pages and store)."""
  from jaxinfer.engine.paged_cache import token_sequence

  g = rule.group
  t = q.shape[0]
  pol = cache.policy
  out = jnp.zeros(q.shape, jnp.float32)
  if has[0]:
    qi = _query_heads(ret, g)
    q_r = q[:, qi]
    if ks is None:
      kp, vp = store(kp, vp, cache.slots, k[:, ret], v[:, ret])
      out_r = cache._attention(q_r, kp.astype(q.dtype), vp.astype(q.dtype), pos, sliding_window)
    else:  # quantize on write; the kernels dequantize the tiles they load
      kp, vp, ks, vs = kv_quant.store(kp, vp, ks, vs, cache.slots, k[:, ret], v[:, ret])
      out_r = cache._attention(q_r, kp, vp, pos, sliding_window, ks, vs)
    out = out.at[:, qi].set(out_r.astype(jnp.float32))
  if has[1]:
    seq, valid = token_sequence(cache.cu_q_lens, cache.num_seqs, t)
    s_pad = cache.kv_lens.shape[0]
    live = jnp.arange(s_pad) < cache.num_seqs
    rows = pol.seq_slots
    # a sequence new to its row starts from an empty store row (padding sequences write nothing)
    reset_rows = jnp.where(live & pol.reset, rows, sp.shape[0])
    sp = sp.at[reset_rows].set(-1, mode="drop")
    qi = _query_heads(strm, g)
    k_s, v_s = k[:, strm], v[:, strm]
    old_k, old_v = sk, sv
    if sks is not None:  # a quantized store: the chunk's own k/v as the store will give them back
      k_s, v_s = kv_quant.roundtrip(k_s, sk.dtype), kv_quant.roundtrip(v_s, sv.dtype)
      old_k, old_v = kv_quant.dequantize(sk, sks), kv_quant.dequantize(sv, svs)
    out_s = _stream_attend(rule, q[:, qi], k_s, v_s, old_k, old_v, sp, rows[seq], seq, valid, pos, sliding_window)
    out = out.at[:, qi].set(out_s)
    k_w, v_w = k[:, strm], v[:, strm]
    end = cache.kv_lens[seq]
    if sks is not None:
      k_w, v_w = _codes(k_w, sk.dtype), _codes(v_w, sv.dtype)
      sks, svs, _ = _stream_write(rule, sks, svs, sp, k_w[1], v_w[1], rows[seq], valid, pos, end)
      k_w, v_w = k_w[0], v_w[0]
    sk, sv, sp = _stream_write(rule, sk, sv, sp, k_w, v_w, rows[seq], valid, pos, end)
  return out, (kp, vp, sk, sv, sp, sks, svs, ks, vs)


def _codes(x, dtype):
  """(codes, per-token scales [T, S, 1]) of x [T, S, d] in a quantized dtype (kv_quant's per-token layout)."""
  s = kv_quant.token_scales(x, dtype)
  return kv_quant.quantize(x, s, dtype), s


def _stream_attend(rule: DuoRule, q, k_new, v_new, sk, sv, sp, row, seq, valid, pos, sliding_window):
  """q [T, S*G, d] over (store row of each query's sequence) + (the step's new keys of that sequence)."""
  t, heads, d = q.shape
  s = k_new.shape[1]
  qg = q.astype(jnp.float32).reshape(t, s, heads // s, d)
  k_old, v_old = sk[row].astype(jnp.float32), sv[row].astype(jnp.float32)  # [T, C, S, d]
  pos_old = sp[row]  # [T, C]
  kn, vn = k_new.astype(jnp.float32), v_new.astype(jnp.float32)
  scale = 1.0 / np.sqrt(d)
  s_old = jnp.einsum("tsgd,tcsd->tsgc", qg, k_old) * scale
  s_new = jnp.einsum("tsgd,usd->tsgu", qg, kn) * scale
  key_new = jnp.broadcast_to(pos[None, :], (t, t))
  if rule.cache_positions:  # sink keys look as if they sat just before the window: rotate the query back
    delta = jnp.maximum(pos - rule.window + 1 - rule.sinks, 0)
    qr = _rotate(qg, -delta, rule.inv_freq)
    s_old = jnp.where((pos_old < rule.sinks)[:, None, None, :],
                      jnp.einsum("tsgd,tcsd->tsgc", qr, k_old) * scale, s_old)
    s_new = jnp.where((key_new < rule.sinks)[:, None, None, :], jnp.einsum("tsgd,usd->tsgu", qr, kn) * scale, s_new)
  p = pos[:, None]

  def seen(kpos):
    vis = (kpos >= 0) & (kpos <= p) & ((kpos < rule.sinks) | (p - kpos < rule.window))
    return vis if sliding_window is None else vis & (p - kpos < sliding_window)

  vis_old = seen(pos_old) & valid[:, None]
  vis_new = seen(key_new) & (seq[None, :] == seq[:, None]) & valid[None, :] & valid[:, None]
  scores = jnp.concatenate([s_old, s_new], axis=-1)
  vis = jnp.concatenate([vis_old, vis_new], axis=-1)[:, None, None, :]
  m = jnp.max(jnp.where(vis, scores, -jnp.inf), axis=-1, keepdims=True)
  e = jnp.where(vis, jnp.exp(scores - jnp.where(jnp.isfinite(m), m, 0.0)), 0.0)
  probs = e / jnp.maximum(e.sum(-1, keepdims=True), 1e-30)
  c = k_old.shape[1]
  out = jnp.einsum("tsgc,tcsd->tsgd", probs[..., :c], v_old) + jnp.einsum("tsgu,usd->tsgd", probs[..., c:], vn)
  return out.reshape(t, heads, d)


def _stream_write(rule: DuoRule, sk, sv, sp, k_new, v_new, row, valid, pos, end):
  """The chunk into the store: sinks at slot p, and per sequence only its last `window` tokens into the ring
  (distinct slots, so the scatter has no collisions); the rest is never seen again."""
  rows, c = sp.shape
  sinks, window = rule.sinks, rule.window
  ring = (pos >= sinks) & (pos >= end - window)
  slot = jnp.where(pos < sinks, pos, sinks + (pos - sinks) % window)
  keep = valid & ((pos < sinks) | ring)
  flat = jnp.where(keep, row * c + slot, rows * c)  # out of range: dropped
  fk = sk.reshape((rows * c,) + sk.shape[2:]).at[flat].set(k_new.astype(sk.dtype), mode="drop")
  fv = sv.reshape((rows * c,) + sv.shape[2:]).at[flat].set(v_new.astype(sv.dtype), mode="drop")
  fp = sp.reshape(-1).at[flat].set(pos, mode="drop")
  return fk.reshape(sk.shape), fv.reshape(sv.shape), fp.reshape(sp.shape)
