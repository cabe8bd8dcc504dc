"""Blockwise FlashAttention in plain jnp/lax: the CPU default and the "xla" baseline of every benchmark.

Forward: `lax.map` over query blocks; for each, a `lax.fori_loop` with a dynamic trip count walks only the
key/value blocks that `tiles.tile_visibility` marks visible (the union over the batch) with the online-softmax
update, so the extra memory is one [block_q, block_k] score tile per head and masked-out tiles cost nothing.

Backward (jax.custom_vjp, no autodiff through the loops): recomputes P tile by tile from the saved log-sum-exp,
delta = rowsum(dO * O) - dlse. It is a single pass (scan over query blocks, carrying float32 dK/dV
accumulators updated in place with dynamic_update_slice), which on CPU beats FA2's two-kernel split because P
is computed once per tile.

Matmul operands stay in the input dtype with float32 accumulation (preferred_element_type), softmax
statistics are float32; P and dS are cast to the input dtype before their matmuls, as the GPU/TPU kernels do.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jax import lax

from pallas_kernels.flash_attention import _common as C
from pallas_kernels.flash_attention import tiles
from pallas_kernels.lse import normalize, online_step
from pallas_kernels.op import always_available

NAME = "xla"
# Tile sizes when block_q/block_k are None. On CPU small tiles stay in cache and skip more masked area
# (measured on 2 cores, causal fwd+bwd, seq 256-2048: 128/128 was 1.5-2x faster than 512/512 and 3-8x faster
# than the dense reference); on accelerators larger tiles mean fewer, bigger matmuls.
DEFAULT_BLOCKS = {"cpu": (128, 128)}
DEFAULT_BLOCKS_OTHER = (512, 512)


unavailable_reason = always_available  # plain XLA runs on every backend


@dataclasses.dataclass(frozen=True)
class _Static:
  params: C.MaskParams
  block_q: int
  block_k: int
  group: int


def _scores(st: _Static, qi, kt):
  """qi [b, h, g*bq, d], kt [b, h, bk, d] -> scaled (and soft-capped) float32 scores [b, h, g, bq, bk]."""
  b, h, gm, _ = qi.shape
  s = jnp.einsum("bhmd,bhkd->bhmk", qi, kt, preferred_element_type=jnp.float32) * st.params.sm_scale
  s = s.reshape(b, h, st.group, gm // st.group, kt.shape[2])
  return C.soft_cap(s, st.params)


def _mask(st: _Static, qpi, qsi, kp, ks, start):
  """Visibility [b, 1, 1, bq, bk] of the tile whose keys start at `start`, or None when nothing is masked."""
  if not C.needs_mask(st.params):
    return None
  kpt = lax.dynamic_slice_in_dim(kp, start, st.block_k, axis=1)
  kst = None if ks is None else lax.dynamic_slice_in_dim(ks, start, st.block_k, axis=1)
  col = lambda x: None if x is None else x[:, None, None, :, None]
  row = lambda x: None if x is None else x[:, None, None, None, :]
  return C.tile_mask(col(qpi), row(kpt), col(qsi), row(kst), st.params)


def _fwd(st: _Static, q, k, v, aux):
  """q [nq, b, h, g*bq, d]; k, v [b, h, Lk, d] -> o like q, lse float32 [nq, b, h, g, bq]."""
  qp, kp, qs, ks, idx, cnt = aux
  _, b, h, gm, d = q.shape
  g, bq, bk = st.group, st.block_q, st.block_k

  def q_block(xs):
    qi, qpi, qsi, idx_i, cnt_i = xs

    def body(t, carry):
      m, l, acc = carry
      start = idx_i[t] * bk
      kt = lax.dynamic_slice_in_dim(k, start, bk, axis=2)
      vt = lax.dynamic_slice_in_dim(v, start, bk, axis=2)
      s, _ = _scores(st, qi, kt)
      mask = _mask(st, qpi, qsi, kp, ks, start)
      if mask is not None:
        s = jnp.where(mask, s, -jnp.inf)
      m_new, l, p, corr = online_step(m, l, s)
      pv = jnp.einsum("bhmk,bhkd->bhmd", p.reshape(b, h, gm, bk).astype(v.dtype), vt,
                      preferred_element_type=jnp.float32)
      acc = corr.reshape(b, h, gm)[..., None] * acc + pv
      return m_new, l, acc

    init = (jnp.full((b, h, g, bq), -jnp.inf, jnp.float32), jnp.zeros((b, h, g, bq), jnp.float32),
            jnp.zeros((b, h, gm, d), jnp.float32))
    m, l, acc = lax.fori_loop(0, cnt_i, body, init)
    o, lse = normalize(acc, l.reshape(b, h, gm), m.reshape(b, h, gm))
    return o.astype(q.dtype), lse.reshape(b, h, g, bq)

  return lax.map(q_block, (q, qp, qs, idx, cnt))  # qs may be None (an empty pytree)


def _bwd(st: _Static, q, k, v, aux, o, lse, do, dlse):
  qp, kp, qs, ks, idx, cnt = aux
  nq, b, h, gm, d = q.shape
  g, bq, bk = st.group, st.block_q, st.block_k
  scale = st.params.sm_scale
  delta = C.backward_delta(o.reshape(nq, b, h, g, bq, d), do.reshape(nq, b, h, g, bq, d), dlse)

  def q_block(carry, xs):
    dk, dv = carry
    qi, doi, lse_i, delta_i, qpi, qsi, idx_i, cnt_i = xs
    lse_i = C.safe_lse(lse_i)

    def body(t, c):
      dq, dk, dv = c
      start = idx_i[t] * bk
      kt = lax.dynamic_slice_in_dim(k, start, bk, axis=2)
      vt = lax.dynamic_slice_in_dim(v, start, bk, axis=2)
      s, th = _scores(st, qi, kt)
      p = jnp.exp(s - lse_i[..., None])
      mask = _mask(st, qpi, qsi, kp, ks, start)
      if mask is not None:
        p = jnp.where(mask, p, 0.0)
      dp = jnp.einsum("bhmd,bhkd->bhmk", doi, vt, preferred_element_type=jnp.float32).reshape(p.shape)
      ds = C.soft_cap_grad(p * (dp - delta_i[..., None]), th, st.params)
      p2 = p.reshape(b, h, gm, bk).astype(do.dtype)
      ds2 = ds.reshape(b, h, gm, bk).astype(q.dtype)
      dv_t = jnp.einsum("bhmk,bhmd->bhkd", p2, doi, preferred_element_type=jnp.float32)
      dk_t = jnp.einsum("bhmk,bhmd->bhkd", ds2, qi, preferred_element_type=jnp.float32) * scale
      dq = dq + jnp.einsum("bhmk,bhkd->bhmd", ds2, kt, preferred_element_type=jnp.float32) * scale
      dk = lax.dynamic_update_slice_in_dim(dk, lax.dynamic_slice_in_dim(dk, start, bk, 2) + dk_t, start, 2)
      dv = lax.dynamic_update_slice_in_dim(dv, lax.dynamic_slice_in_dim(dv, start, bk, 2) + dv_t, start, 2)
      return dq, dk, dv

    dq, dk, dv = lax.fori_loop(0, cnt_i, body, (jnp.zeros((b, h, gm, d), jnp.float32), dk, dv))
    return (dk, dv), dq

  zeros_kv = jnp.zeros(k.shape, jnp.float32)
  (dk, dv), dq = lax.scan(q_block, (zeros_kv, zeros_kv), (q, do, lse, delta, qp, qs, idx, cnt))
  return dq, dk, dv


_core = C.make_core(_fwd, _bwd)


def flash_attention(q, k, v, *, causal=True, sm_scale=None, q_positions=None, kv_positions=None,
                    q_segment_ids=None, kv_segment_ids=None, sliding_window=None, logits_soft_cap=None,
                    return_lse=False, interpret=False, block_q: int | None = None,
                    block_k: int | None = None):
  """Same contract as `pallas_kernels.flash_attention`; block_q/block_k are the tile sizes (any positive int,
  clipped to the sequence lengths; None: DEFAULT_BLOCKS for the backend). `interpret` is ignored."""
  del interpret
  default_q, default_k = DEFAULT_BLOCKS.get(jax.default_backend(), DEFAULT_BLOCKS_OTHER)
  block_q = default_q if block_q is None else block_q
  block_k = default_k if block_k is None else block_k
  inp = C.prepare(q, k, v, causal=causal, sm_scale=sm_scale, q_positions=q_positions,
                  kv_positions=kv_positions, q_segment_ids=q_segment_ids, kv_segment_ids=kv_segment_ids,
                  sliding_window=sliding_window, logits_soft_cap=logits_soft_cap)
  C.check_block("block_q", block_q, implementation=NAME)
  C.check_block("block_k", block_k, implementation=NAME)
  b, q_len, hq, d = q.shape
  kv_len, hkv = k.shape[1], k.shape[2]
  g = hq // hkv
  bq, bk = min(block_q, q_len), min(block_k, kv_len)
  q_pad, kv_pad = C.round_up(q_len, bq), C.round_up(kv_len, bk)
  nq, nk = q_pad // bq, kv_pad // bk
  tok, params = C.pad_tokens(inp, q_pad, kv_pad)
  # One tile list for the whole batch (union): the loops then slice K/V with a scalar index.
  idx, cnt = tiles.block_lists(C.visibility(inp, bq, bk, nq, nk).any(axis=0))

  # Blocked layouts: q [nq, b, hkv, g*bq, d]; k, v [b, hkv, Lk, d]; per-block token ids [nq, b, bq].
  qx = C.pad_axis(q, 1, q_pad).reshape(b, nq, bq, hkv, g, d).transpose(1, 0, 3, 4, 2, 5)
  qx = qx.reshape(nq, b, hkv, g * bq, d)
  kx = C.pad_axis(k, 1, kv_pad).transpose(0, 2, 1, 3)
  vx = C.pad_axis(v, 1, kv_pad).transpose(0, 2, 1, 3)
  blk = lambda x: None if x is None else x.reshape(b, nq, bq).transpose(1, 0, 2)
  aux = (blk(tok.q_positions), tok.kv_positions, blk(tok.q_segment_ids), tok.kv_segment_ids, idx, cnt)
  static = _Static(params=params, block_q=bq, block_k=bk, group=g)
  o, lse = _core(static, qx, kx, vx, aux)

  o = o.reshape(nq, b, hkv, g, bq, d).transpose(1, 0, 4, 2, 3, 5).reshape(b, q_pad, hq, d)[:, :q_len]
  if not return_lse:
    return o
  lse = lse.transpose(1, 2, 3, 0, 4).reshape(b, hq, q_pad)[:, :, :q_len]
  return o, lse
