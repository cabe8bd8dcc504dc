"""FlashAttention-2 for TPUs in Pallas Mosaic TPU ("pallas_tpu").

Block-sparse through scalar prefetch: the wrapper compacts `tiles.tile_visibility` into, for every
(batch, row block), the count and the ascending list of visible column blocks (flattened int32 tables in
SMEM). The grid's last axis walks that list; BlockSpec index maps read the table, and past the count the
list repeats its last entry, so the pipeline issues no new DMA and `pl.when(t < count)` skips the compute.
Hidden tiles therefore cost only an empty grid step.

Kernels, on [batch, heads, seq, head_dim] (the wrapper transposes from the [batch, seq, heads, head_dim] API
layout so that every block's last two dims are (rows, head_dim)):
  forward (b, q_head, q_block, t):        online softmax, m/l/acc in VMEM scratch, O and lse at the last t.
  dq      (b, q_head, q_block, t):        recomputes P from lse, dS = P * (dP - delta), dQ += dS K.
  dk/dv   (b, kv_head, kv_block, g, t):   for each q head of the GQA group and each visible q block,
                                          works on the transposed tile S^T = K Q^T (so lse/delta broadcast
                                          along lanes), dV += P^T dO, dK += dS^T Q.
Layout rules of Mosaic: per-row values (q positions/segments, lse, delta, m, l) are kept replicated over
128 lanes ([rows, 128]) and per-column values over 8 sublanes ([8, cols]), the layouts Mosaic handles
natively; blocks must have their last two dims divisible by (8, 128) or equal to the array's, so on hardware
block sizes are multiples of 128 (a sequence shorter than the block becomes one block of its length rounded
up to 8). Interpret mode (`interpret=True`, run through `pltpu.InterpretParams`) accepts multiples of 8 so
that small tests exercise many tiles; the test suite also lowers the kernels for the "tpu" platform on CPU
with 128-multiples to check the hardware rules.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.flash_attention import _common as C
from pallas_kernels.flash_attention import tiles
from pallas_kernels.mosaic import LANES, SUBLANES
from pallas_kernels.mosaic import interpret_params as _interpret_params
from pallas_kernels.mosaic import lanes_to as _lanes_to
from pallas_kernels.mosaic import mxu_dot as _dot
from pallas_kernels.op import requires_backend

NAME = "pallas_tpu"
DEFAULT_BLOCK_Q = 128
DEFAULT_BLOCK_K = 128
DEFAULT_BLOCK_Q_BWD = 128
DEFAULT_BLOCK_K_BWD = 128


unavailable_reason = requires_backend("tpu", NAME, interpret_mode="TPU interpret mode")


@dataclasses.dataclass(frozen=True)
class _Static:
  params: C.MaskParams
  block_q: int
  block_k: int
  block_q_bwd: int
  block_k_bwd: int
  group: int
  interpret: object  # False or a pltpu.InterpretParams (hashable frozen dataclass)


def _unpack(refs, has_segments: bool, n_lead: int):
  """Splits kernel refs into (leading inputs, (pos_a, pos_b, seg_a, seg_b), outputs + scratch)."""
  lead = refs[:n_lead]
  n_tok = 4 if has_segments else 2
  tok = refs[n_lead:n_lead + n_tok]
  if not has_segments:
    tok = (tok[0], tok[1], None, None)
  return lead, tok, refs[n_lead + n_tok:]


# -------------------------------------------------------------------------------------------------- forward


def _fwd_kernel(idx_ref, cnt_ref, *refs, st: _Static, nq: int, nk: int):
  del idx_ref
  p = st.params
  (q_ref, k_ref, v_ref), (qp_ref, kp_ref, qs_ref, ks_ref), (o_ref, lse_ref, m_sc, l_sc, acc_sc) = _unpack(
      refs, p.has_segments, 3)
  b, i, t = pl.program_id(0), pl.program_id(2), pl.program_id(3)
  bk = st.block_k

  @pl.when(t == 0)
  def _():
    m_sc[...] = jnp.full(m_sc.shape, -jnp.inf, jnp.float32)
    l_sc[...] = jnp.zeros(l_sc.shape, jnp.float32)
    acc_sc[...] = jnp.zeros(acc_sc.shape, jnp.float32)

  @pl.when(t < cnt_ref[b * nq + i])
  def _():
    q = q_ref[...]
    v = v_ref[...]
    s = _dot(q, k_ref[...], trans_b=True) * p.sm_scale
    s, _ = C.soft_cap(s, p)
    if C.needs_mask(p):
      mask = C.tile_mask(_lanes_to(qp_ref[...], bk), kp_ref[0:1, :],
                         None if qs_ref is None else _lanes_to(qs_ref[...], bk),
                         None if ks_ref is None else ks_ref[0:1, :], p)
      s = jnp.where(mask, s, -jnp.inf)
    m_prev = m_sc[...]
    m_next = jnp.maximum(m_prev, jnp.max(s, axis=1)[:, None])  # [bq, 128]
    m_safe = jnp.where(m_next == -jnp.inf, 0.0, m_next)
    pr = jnp.exp(s - _lanes_to(m_safe, bk))
    corr = jnp.exp(m_prev - m_safe)
    l_sc[...] = corr * l_sc[...] + jnp.sum(pr, axis=1)[:, None]
    m_sc[...] = m_next
    acc_sc[...] = acc_sc[...] * _lanes_to(corr, acc_sc.shape[1]) + _dot(pr.astype(v.dtype), v)

  @pl.when(t == nk - 1)
  def _():
    l = l_sc[...]
    empty = l == 0.0
    l_safe = jnp.where(empty, 1.0, l)
    o_ref[...] = (acc_sc[...] / _lanes_to(l_safe, acc_sc.shape[1])).astype(o_ref.dtype)
    lse_ref[...] = jnp.where(empty, -jnp.inf, m_sc[...] + jnp.log(l_safe))


def _col(x):
  return None if x is None else jnp.broadcast_to(x[:, :, None], (*x.shape, LANES))


def _row(x):
  return None if x is None else jnp.broadcast_to(x[:, None, :], (x.shape[0], SUBLANES, x.shape[1]))


def _tok_args(a_col, b_row, a_seg_col, b_seg_row, has_segments):
  return [a_col, b_row] + ([a_seg_col, b_seg_row] if has_segments else [])


def _fwd(st: _Static, q, k, v, aux):
  """q [b, hq, Lq, d]; k, v [b, hkv, Lk, d] -> o like q, lse float32 [b, hq, Lq]."""
  b, hq, lq, d = q.shape
  lk = k.shape[2]
  bq, bk, g = st.block_q, st.block_k, st.group
  nq, nk = lq // bq, lk // bk
  qp, kp, qs, ks = aux["tokens"]
  idx, cnt = aux["fwd"]
  has_seg = st.params.has_segments

  kv_block = lambda bi, i, t, idx_ref: idx_ref[(bi * nq + i) * nk + t]
  in_specs = [
      pl.BlockSpec((None, None, bq, d), lambda bi, h, i, t, idx_ref, cnt_ref: (bi, h, i, 0)),
      pl.BlockSpec((None, None, bk, d), lambda bi, h, i, t, idx_ref, cnt_ref:
                   (bi, lax.div(h, g), kv_block(bi, i, t, idx_ref), 0)),
      pl.BlockSpec((None, None, bk, d), lambda bi, h, i, t, idx_ref, cnt_ref:
                   (bi, lax.div(h, g), kv_block(bi, i, t, idx_ref), 0)),
  ]
  q_tok = pl.BlockSpec((None, bq, LANES), lambda bi, h, i, t, idx_ref, cnt_ref: (bi, i, 0))
  kv_tok = pl.BlockSpec((None, SUBLANES, bk), lambda bi, h, i, t, idx_ref, cnt_ref:
                        (bi, 0, kv_block(bi, i, t, idx_ref)))
  in_specs += [q_tok, kv_tok] + ([q_tok, kv_tok] if has_seg else [])
  out_specs = [pl.BlockSpec((None, None, bq, d), lambda bi, h, i, t, idx_ref, cnt_ref: (bi, h, i, 0)),
               pl.BlockSpec((None, None, bq, LANES), lambda bi, h, i, t, idx_ref, cnt_ref: (bi, h, i, 0))]
  o, lse = pl.pallas_call(
      functools.partial(_fwd_kernel, st=st, nq=nq, nk=nk),
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=2, grid=(b, hq, nq, nk), in_specs=in_specs, out_specs=out_specs,
          scratch_shapes=[pltpu.VMEM((bq, LANES), jnp.float32), pltpu.VMEM((bq, LANES), jnp.float32),
                          pltpu.VMEM((bq, d), jnp.float32)]),
      out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype), jax.ShapeDtypeStruct((b, hq, lq, LANES), jnp.float32)],
      compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "parallel", "arbitrary")),
      interpret=st.interpret,
      name="flash_attention_fwd",
  )(idx, cnt, q, k, v, *_tok_args(_col(qp), _row(kp), _col(qs), _row(ks), has_seg))
  return o, lse[..., 0]


# ------------------------------------------------------------------------------------------------- backward


def _dq_kernel(idx_ref, cnt_ref, *refs, st: _Static, nq: int, nk: int):
  del idx_ref
  p = st.params
  lead, (qp_ref, kp_ref, qs_ref, ks_ref), (dq_ref, dq_sc) = _unpack(refs, p.has_segments, 6)
  q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref = lead
  b, i, t = pl.program_id(0), pl.program_id(2), pl.program_id(3)
  bk = st.block_k_bwd

  @pl.when(t == 0)
  def _():
    dq_sc[...] = jnp.zeros(dq_sc.shape, jnp.float32)

  @pl.when(t < cnt_ref[b * nq + i])
  def _():
    q, k, v, do = q_ref[...], k_ref[...], v_ref[...], do_ref[...]
    s = _dot(q, k, trans_b=True) * p.sm_scale
    s, th = C.soft_cap(s, p)
    pr = jnp.exp(s - _lanes_to(C.safe_lse(lse_ref[...]), bk))
    if C.needs_mask(p):
      mask = C.tile_mask(_lanes_to(qp_ref[...], bk), kp_ref[0:1, :],
                         None if qs_ref is None else _lanes_to(qs_ref[...], bk),
                         None if ks_ref is None else ks_ref[0:1, :], p)
      pr = jnp.where(mask, pr, 0.0)
    dp = _dot(do, v, trans_b=True)
    ds = C.soft_cap_grad(pr * (dp - _lanes_to(delta_ref[...], bk)), th, p)
    dq_sc[...] += _dot(ds.astype(k.dtype), k)

  @pl.when(t == nk - 1)
  def _():
    dq_ref[...] = (dq_sc[...] * p.sm_scale).astype(dq_ref.dtype)


def _dkv_kernel(idx_ref, cnt_ref, *refs, st: _Static, nq: int, nk: int):
  del idx_ref
  p = st.params
  lead, (kp_ref, qp_ref, ks_ref, qs_ref), (dk_ref, dv_ref, dk_sc, dv_sc) = _unpack(refs, p.has_segments, 6)
  q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref = lead
  b, j, gi, t = pl.program_id(0), pl.program_id(2), pl.program_id(3), pl.program_id(4)
  bq = st.block_q_bwd

  @pl.when((gi == 0) & (t == 0))
  def _():
    dk_sc[...] = jnp.zeros(dk_sc.shape, jnp.float32)
    dv_sc[...] = jnp.zeros(dv_sc.shape, jnp.float32)

  @pl.when(t < cnt_ref[b * nk + j])
  def _():
    q, k, v, do = q_ref[...], k_ref[...], v_ref[...], do_ref[...]
    s_t = _dot(k, q, trans_b=True) * p.sm_scale  # [bk, bq] = (Q K^T)^T
    s_t, th = C.soft_cap(s_t, p)
    pr_t = jnp.exp(s_t - C.safe_lse(lse_ref[0:1, :]))
    if C.needs_mask(p):
      mask = C.tile_mask(qp_ref[0:1, :], _lanes_to(kp_ref[...], bq),
                         None if qs_ref is None else qs_ref[0:1, :],
                         None if ks_ref is None else _lanes_to(ks_ref[...], bq), p)
      pr_t = jnp.where(mask, pr_t, 0.0)
    dv_sc[...] += _dot(pr_t.astype(do.dtype), do)
    dp_t = _dot(v, do, trans_b=True)
    ds_t = C.soft_cap_grad(pr_t * (dp_t - delta_ref[0:1, :]), th, p)
    dk_sc[...] += _dot(ds_t.astype(q.dtype), q)

  @pl.when((gi == st.group - 1) & (t == nq - 1))
  def _():
    dk_ref[...] = (dk_sc[...] * p.sm_scale).astype(dk_ref.dtype)
    dv_ref[...] = dv_sc[...].astype(dv_ref.dtype)


def _bwd(st: _Static, q, k, v, aux, o, lse, do, dlse):
  b, hq, lq, d = q.shape
  hkv, lk = k.shape[1], k.shape[2]
  bq, bk, g = st.block_q_bwd, st.block_k_bwd, st.group
  nq, nk = lq // bq, lk // bk
  qp, kp, qs, ks = aux["tokens"]
  has_seg = st.params.has_segments
  delta = C.backward_delta(o, do, dlse)  # [b, hq, Lq]
  col = lambda x: jnp.broadcast_to(x[..., None], (*x.shape, LANES))
  row = lambda x: jnp.broadcast_to(x[:, :, None, :], (*x.shape[:2], SUBLANES, x.shape[2]))

  # dq: grid (b, q_head, q_block, t over visible kv blocks).
  idx, cnt = aux["dq"]
  kv_block = lambda bi, i, t, idx_ref: idx_ref[(bi * nq + i) * nk + t]
  q_blk = pl.BlockSpec((None, None, bq, d), lambda bi, h, i, t, idx_ref, cnt_ref: (bi, h, i, 0))
  kv_blk = pl.BlockSpec((None, None, bk, d), lambda bi, h, i, t, idx_ref, cnt_ref:
                        (bi, lax.div(h, g), kv_block(bi, i, t, idx_ref), 0))
  q_lanes = pl.BlockSpec((None, None, bq, LANES), lambda bi, h, i, t, idx_ref, cnt_ref: (bi, h, i, 0))
  q_tok = pl.BlockSpec((None, bq, LANES), lambda bi, h, i, t, idx_ref, cnt_ref: (bi, i, 0))
  kv_tok = pl.BlockSpec((None, SUBLANES, bk), lambda bi, h, i, t, idx_ref, cnt_ref:
                        (bi, 0, kv_block(bi, i, t, idx_ref)))
  dq = pl.pallas_call(
      functools.partial(_dq_kernel, st=st, nq=nq, nk=nk),
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=2, grid=(b, hq, nq, nk),
          in_specs=[q_blk, kv_blk, kv_blk, q_blk, q_lanes, q_lanes, q_tok, kv_tok]
          + ([q_tok, kv_tok] if has_seg else []),
          out_specs=q_blk, scratch_shapes=[pltpu.VMEM((bq, d), jnp.float32)]),
      out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
      compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "parallel", "arbitrary")),
      interpret=st.interpret,
      name="flash_attention_dq",
  )(idx, cnt, q, k, v, do, col(lse), col(delta), *_tok_args(_col(qp), _row(kp), _col(qs), _row(ks), has_seg))

  # dk/dv: grid (b, kv_head, kv_block, q head in group, t over visible q blocks).
  idx, cnt = aux["dkv"]
  q_block = lambda bi, j, t, idx_ref: idx_ref[(bi * nk + j) * nq + t]
  q_blk = pl.BlockSpec((None, None, bq, d), lambda bi, h, j, gi, t, idx_ref, cnt_ref:
                       (bi, h * g + gi, q_block(bi, j, t, idx_ref), 0))
  kv_blk = pl.BlockSpec((None, None, bk, d), lambda bi, h, j, gi, t, idx_ref, cnt_ref: (bi, h, j, 0))
  q_sub = pl.BlockSpec((None, None, SUBLANES, bq), lambda bi, h, j, gi, t, idx_ref, cnt_ref:
                       (bi, h * g + gi, 0, q_block(bi, j, t, idx_ref)))
  kv_tok = pl.BlockSpec((None, bk, LANES), lambda bi, h, j, gi, t, idx_ref, cnt_ref: (bi, j, 0))
  q_tok = pl.BlockSpec((None, SUBLANES, bq), lambda bi, h, j, gi, t, idx_ref, cnt_ref:
                       (bi, 0, q_block(bi, j, t, idx_ref)))
  dk, dv = pl.pallas_call(
      functools.partial(_dkv_kernel, st=st, nq=nq, nk=nk),
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=2, grid=(b, hkv, nk, g, nq),
          in_specs=[q_blk, kv_blk, kv_blk, q_blk, q_sub, q_sub, kv_tok, q_tok]
          + ([kv_tok, q_tok] if has_seg else []),
          out_specs=[kv_blk, kv_blk],
          scratch_shapes=[pltpu.VMEM((bk, d), jnp.float32), pltpu.VMEM((bk, d), jnp.float32)]),
      out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
      compiler_params=pltpu.CompilerParams(
          dimension_semantics=("parallel", "parallel", "parallel", "arbitrary", "arbitrary")),
      interpret=st.interpret,
      name="flash_attention_dkv",
  )(idx, cnt, q, k, v, do, row(lse), row(delta), *_tok_args(_col(kp), _row(qp), _col(ks), _row(qs), has_seg))
  return dq, dk, dv


_core = C.make_core(_fwd, _bwd)


# -------------------------------------------------------------------------------------------------- wrapper


def _tables(vis):
  idx, cnt = tiles.block_lists(vis)
  return idx.reshape(-1), cnt.reshape(-1)


def _plan(length: int, block: int, block_bwd: int, align: int) -> tuple[int, int, int]:
  """(padded length, forward block, backward block). A sequence no longer than both blocks becomes a single
  block of its length rounded up to `align` (then block == full dim, which Mosaic accepts)."""
  if length <= min(block, block_bwd):
    n = C.round_up(length, align)
    return n, n, n
  n = C.round_up(length, math.lcm(block, block_bwd))
  return n, min(block, n), min(block_bwd, n)


def flash_attention(q, k, v, *, causal=True, sm_scale=None, q_positions=None, kv_positions=None,
                    q_segment_ids=None, kv_segment_ids=None, sliding_window=None, logits_soft_cap=None,
                    return_lse=False, interpret=False, block_q: int = DEFAULT_BLOCK_Q,
                    block_k: int = DEFAULT_BLOCK_K, block_q_bwd: int = DEFAULT_BLOCK_Q_BWD,
                    block_k_bwd: int = DEFAULT_BLOCK_K_BWD):
  """Same contract as `pallas_kernels.flash_attention`. Block sizes: multiples of 128 on TPU hardware, of 8 in
  interpret mode. interpret=True (or a `pltpu.InterpretParams`) runs the kernels in TPU interpret mode."""
  inp = C.prepare(q, k, v, causal=causal, sm_scale=sm_scale, q_positions=q_positions,
                  kv_positions=kv_positions, q_segment_ids=q_segment_ids, kv_segment_ids=kv_segment_ids,
                  sliding_window=sliding_window, logits_soft_cap=logits_soft_cap)
  interp = _interpret_params(interpret)
  multiple = SUBLANES if interp else LANES
  for name, val in (("block_q", block_q), ("block_k", block_k), ("block_q_bwd", block_q_bwd),
                    ("block_k_bwd", block_k_bwd)):
    C.check_block(name, val, multiple_of=multiple, minimum=multiple, implementation=NAME)
  b, q_len, hq, d = q.shape
  kv_len, hkv = k.shape[1], k.shape[2]
  q_pad, bq, bq_b = _plan(q_len, block_q, block_q_bwd, SUBLANES)
  kv_pad, bk, bk_b = _plan(kv_len, block_k, block_k_bwd, SUBLANES)
  tok, params = C.pad_tokens(inp, q_pad, kv_pad)

  vis_f = C.visibility(inp, bq, bk, q_pad // bq, kv_pad // bk)
  vis_b = vis_f if (bq_b, bk_b) == (bq, bk) else C.visibility(inp, bq_b, bk_b, q_pad // bq_b, kv_pad // bk_b)
  aux = {"tokens": (tok.q_positions, tok.kv_positions, tok.q_segment_ids, tok.kv_segment_ids),
         "fwd": _tables(vis_f), "dq": _tables(vis_b), "dkv": _tables(jnp.swapaxes(vis_b, 1, 2))}
  static = _Static(params=params, block_q=bq, block_k=bk, block_q_bwd=bq_b, block_k_bwd=bk_b, group=hq // hkv,
                   interpret=interp)
  to_bhsd = lambda x, n: C.pad_axis(x, 1, n).transpose(0, 2, 1, 3)
  o, lse = _core(static, to_bhsd(q, q_pad), to_bhsd(k, kv_pad), to_bhsd(v, kv_pad), aux)
  o = o.transpose(0, 2, 1, 3)[:, :q_len]
  if not return_lse:
    return o
  return o, lse[:, :, :q_len]
