"""FlashAttention-2 for NVIDIA GPUs in Pallas, Triton-style ("pallas_gpu").

Which Pallas GPU path, and why (checked against the installed JAX 0.10.2 source and the Pallas changelog):

* JAX 0.10 has two Pallas GPU lowerings. `pl.pallas_call` without compiler params goes to Mosaic GPU (the
  `jax_pallas_use_mosaic_gpu` flag defaults to True) and warns that pallas_call for Mosaic GPU is deprecated
  in favour of `plgpu.kernel`; passing `jax.experimental.pallas.triton.CompilerParams` selects the Triton
  lowering. JAX 0.11's Pallas changelog deprecates the Triton backend ("will be removed in a future
  version"): it still ships and works there, with a deprecation warning.
* Mosaic GPU kernels worth writing (TMA copies, wgmma/tcgen05, barriers, warp specialisation) use primitives
  whose CPU interpreter (`InterpretGPUParams`) exists only under `jax._src` in 0.10 (not exported from
  `jax.experimental.pallas.mosaic_gpu`), is documented nowhere, and does not run `pl.load`/`pl.store`.
  Such a kernel could not be verified by this project's CPU-only test suite.
* The portable Triton-style kernel (BlockSpecs over a grid, ref indexing with `pl.ds`, `plgpu.dot` (the
  Triton module's dot; `pl.dot` is deprecated), `pl.program_id`, `lax.fori_loop`) runs under the generic
  `interpret=True` interpreter on CPU and lowers for CUDA with `plgpu.CompilerParams(num_warps, num_stages)`.
  Verified on 0.10.2 here; 0.11 keeps both the generic interpreter and the (deprecated) Triton lowering, so
  it should run there too (not verified: 0.11 is not installed). The test suite also lowers the kernels for
  the "cuda" platform on CPU (Triton IR is produced without a GPU), which checks the Triton-specific rules
  (power-of-two tile shapes, supported primitives); only PTX compilation and running need a GPU.

So this module is the Triton path, selected explicitly through `plgpu.CompilerParams` so that JAX's Mosaic
GPU default does not pick it up. When Triton is removed upstream, a Hopper/Blackwell Mosaic GPU kernel
(`plgpu.kernel`) should be added next to it as its own registry entry, keeping this one as the portable path.

Kernels (grid = (blocks, batch, heads); each walks a compacted list of visible tiles, see tiles.py):
  forward  (q_block, b, q_head):  online softmax over the visible kv blocks; writes O and lse (float32).
  dq       (q_block, b, q_head):  recomputes P = exp(S - lse), dS = P * (dP - delta), dQ = dS K.
  dk/dv    (kv_block, b, kv_head): loops over the q heads of its GQA group and their visible q blocks,
                                   dV = P^T dO, dK = dS^T Q; no atomics, GQA sums stay in registers.
Softmax runs in base 2 (exp2 with log2(e) folded into the scores); lse is returned in natural log.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.flash_attention import _common as C
from pallas_kernels.flash_attention import tiles
from pallas_kernels.op import requires_backend

NAME = "pallas_gpu"
DEFAULT_BLOCK_Q = 128
DEFAULT_BLOCK_K = 64
DEFAULT_BLOCK_Q_BWD = 64
DEFAULT_BLOCK_K_BWD = 64
_MIN_BLOCK = 16  # tl.dot needs every matmul dimension >= 16
_LOG2E = math.log2(math.e)
_LN2 = math.log(2.0)


unavailable_reason = requires_backend("gpu", NAME)


@dataclasses.dataclass(frozen=True)
class _Static:
  params: C.MaskParams
  block_q: int
  block_k: int
  block_q_bwd: int
  block_k_bwd: int
  group: int
  num_warps: int
  num_warps_bwd: int
  num_stages: int
  interpret: bool


def _precision(dtype):
  return lax.Precision.HIGHEST if dtype == jnp.float32 else None


def _scores2(q, k, params, precision):
  """Base-2 scores [bq, bk] (natural scores times log2 e) and the soft-cap tanh for the backward."""
  s = plgpu.dot(q, k, trans_b=True, precision=precision) * params.sm_scale
  s, th = C.soft_cap(s, params)
  return s * _LOG2E, th


def _compiler_params(num_warps, num_stages):
  return plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages)


# -------------------------------------------------------------------------------------------------- forward


def _fwd_kernel(*refs, st: _Static):
  p = st.params
  if p.has_segments:
    tab_ref, q_ref, k_ref, v_ref, qp_ref, kp_ref, qs_ref, ks_ref, o_ref, lse_ref = refs
  else:
    tab_ref, q_ref, k_ref, v_ref, qp_ref, kp_ref, o_ref, lse_ref = refs
    qs_ref = ks_ref = None
  bq, bk = st.block_q, st.block_k
  prec = _precision(q_ref.dtype)
  q = q_ref[...]
  q_pos = qp_ref[...]
  q_seg = None if qs_ref is None else qs_ref[...]

  def body(t, carry):
    m, l, acc = carry
    start = pl.multiple_of(tab_ref[t + 1] * bk, bk)
    kv = pl.ds(start, bk)
    s, _ = _scores2(q, k_ref[kv, :], p, prec)
    if C.needs_mask(p):
      mask = C.tile_mask(q_pos[:, None], kp_ref[kv][None, :], None if q_seg is None else q_seg[:, None],
                         None if ks_ref is None else ks_ref[kv][None, :], p)
      s = jnp.where(mask, s, -jnp.inf)
    m_new = jnp.maximum(m, jnp.max(s, axis=1))
    m_safe = jnp.where(m_new == -jnp.inf, 0.0, m_new)
    pr = jnp.exp2(s - m_safe[:, None])
    corr = jnp.exp2(m - m_safe)
    l = corr * l + jnp.sum(pr, axis=1)
    v = v_ref[kv, :]
    acc = corr[:, None] * acc + plgpu.dot(pr.astype(v.dtype), v, precision=prec)
    return m_new, l, acc

  init = (jnp.full((bq,), -jnp.inf, jnp.float32), jnp.zeros((bq,), jnp.float32),
          jnp.zeros((bq, q.shape[-1]), jnp.float32))
  m, l, acc = lax.fori_loop(0, tab_ref[0], body, init)
  empty = l == 0.0
  l_safe = jnp.where(empty, 1.0, l)
  o_ref[...] = (acc / l_safe[:, None]).astype(o_ref.dtype)
  lse_ref[...] = jnp.where(empty, -jnp.inf, (m + jnp.log2(l_safe)) * _LN2)


def _token_specs(st: _Static, q_spec_fn, kv_spec_fn):
  return [q_spec_fn, kv_spec_fn] + ([q_spec_fn, kv_spec_fn] if st.params.has_segments else [])


def _tokens(aux, st):
  qp, kp, qs, ks = aux[:4]
  return [qp, kp] + ([qs, ks] if st.params.has_segments else [])


def _fwd(st: _Static, q, k, v, aux):
  """q [b, Lq, hq, d]; k, v [b, Lk, hkv, d] (lengths padded to block multiples) -> o, lse [b, hq, Lq]."""
  b, lq, hq, d = q.shape
  lk = k.shape[1]
  bq, g = st.block_q, st.group
  kv_tab = aux[4]
  nq, nk1 = kv_tab.shape[1], kv_tab.shape[2]
  in_specs = [
      pl.BlockSpec((None, None, nk1), lambda i, j, h: (j, i, 0)),
      pl.BlockSpec((None, bq, None, d), lambda i, j, h: (j, i, h, 0)),
      pl.BlockSpec((None, lk, None, d), lambda i, j, h: (j, 0, lax.div(h, g), 0)),
      pl.BlockSpec((None, lk, None, d), lambda i, j, h: (j, 0, lax.div(h, g), 0)),
  ] + _token_specs(st, pl.BlockSpec((None, bq), lambda i, j, h: (j, i)),
                   pl.BlockSpec((None, lk), lambda i, j, h: (j, 0)))
  o, lse = pl.pallas_call(
      functools.partial(_fwd_kernel, st=st),
      grid=(nq, b, hq),
      in_specs=in_specs,
      out_specs=[pl.BlockSpec((None, bq, None, d), lambda i, j, h: (j, i, h, 0)),
                 pl.BlockSpec((None, None, bq), lambda i, j, h: (j, h, i))],
      out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype), jax.ShapeDtypeStruct((b, hq, lq), jnp.float32)],
      compiler_params=_compiler_params(st.num_warps, st.num_stages),
      interpret=st.interpret,
      name="flash_attention_fwd",
  )(kv_tab, q, k, v, *_tokens(aux, st))
  return o, lse


# ------------------------------------------------------------------------------------------------- backward


def _dq_kernel(*refs, st: _Static):
  p = st.params
  if p.has_segments:
    tab_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, qp_ref, kp_ref, qs_ref, ks_ref, dq_ref = refs
  else:
    tab_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, qp_ref, kp_ref, dq_ref = refs
    qs_ref = ks_ref = None
  bk = st.block_k_bwd
  prec = _precision(q_ref.dtype)
  q = q_ref[...]
  do = do_ref[...]
  lse2 = C.safe_lse(lse_ref[...]) * _LOG2E
  delta = delta_ref[...]
  q_pos = qp_ref[...]
  q_seg = None if qs_ref is None else qs_ref[...]

  def body(t, dq):
    start = pl.multiple_of(tab_ref[t + 1] * bk, bk)
    kv = pl.ds(start, bk)
    k = k_ref[kv, :]
    s, th = _scores2(q, k, p, prec)
    pr = jnp.exp2(s - lse2[:, None])
    if C.needs_mask(p):
      mask = C.tile_mask(q_pos[:, None], kp_ref[kv][None, :], None if q_seg is None else q_seg[:, None],
                         None if ks_ref is None else ks_ref[kv][None, :], p)
      pr = jnp.where(mask, pr, 0.0)
    dp = plgpu.dot(do, v_ref[kv, :], trans_b=True, precision=prec)
    ds = C.soft_cap_grad(pr * (dp - delta[:, None]), th, p)
    return dq + plgpu.dot(ds.astype(k.dtype), k, precision=prec)

  dq = lax.fori_loop(0, tab_ref[0], body, jnp.zeros(q.shape, jnp.float32))
  dq_ref[...] = (dq * p.sm_scale).astype(dq_ref.dtype)


def _dkv_kernel(*refs, st: _Static):
  p = st.params
  if p.has_segments:
    (tab_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, qp_ref, kp_ref, qs_ref, ks_ref,
     dk_ref, dv_ref) = refs
  else:
    tab_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, qp_ref, kp_ref, dk_ref, dv_ref = refs
    qs_ref = ks_ref = None
  bq = st.block_q_bwd
  prec = _precision(k_ref.dtype)
  k = k_ref[...]
  v = v_ref[...]
  kv_pos = kp_ref[...]
  kv_seg = None if ks_ref is None else ks_ref[...]
  count = tab_ref[0]

  def head_body(gi, carry):
    def body(t, carry):
      dk, dv = carry
      start = pl.multiple_of(tab_ref[t + 1] * bq, bq)
      qs = pl.ds(start, bq)
      q = q_ref[qs, gi, :]
      do = do_ref[qs, gi, :]
      s, th = _scores2(q, k, p, prec)
      pr = jnp.exp2(s - (C.safe_lse(lse_ref[gi, qs]) * _LOG2E)[:, None])
      if C.needs_mask(p):
        mask = C.tile_mask(qp_ref[qs][:, None], kv_pos[None, :],
                           None if qs_ref is None else qs_ref[qs][:, None],
                           None if kv_seg is None else kv_seg[None, :], p)
        pr = jnp.where(mask, pr, 0.0)
      dv = dv + plgpu.dot(pr.astype(do.dtype), do, trans_a=True, precision=prec)
      dp = plgpu.dot(do, v, trans_b=True, precision=prec)
      ds = C.soft_cap_grad(pr * (dp - delta_ref[gi, qs][:, None]), th, p)
      dk = dk + plgpu.dot(ds.astype(q.dtype), q, trans_a=True, precision=prec)
      return dk, dv

    return lax.fori_loop(0, count, body, carry)

  zeros = jnp.zeros(k.shape, jnp.float32)
  dk, dv = lax.fori_loop(0, st.group, head_body, (zeros, zeros))
  dk_ref[...] = (dk * p.sm_scale).astype(dk_ref.dtype)
  dv_ref[...] = dv.astype(dv_ref.dtype)


def _bwd(st: _Static, q, k, v, aux, o, lse, do, dlse):
  b, lq, hq, d = q.shape
  lk, hkv = k.shape[1], k.shape[2]
  g, bq, bk = st.group, st.block_q_bwd, st.block_k_bwd
  q_tab, kv_tab = aux[5], aux[6]  # backward tables: per q block (dq) and per kv block (dk/dv)
  delta = C.backward_delta(o, do, jnp.swapaxes(dlse, 1, 2)).swapaxes(1, 2)  # [b, hq, Lq]
  nq, nk = lq // bq, lk // bk
  cp = _compiler_params(st.num_warps_bwd, st.num_stages)

  dq = pl.pallas_call(
      functools.partial(_dq_kernel, st=st),
      grid=(nq, b, hq),
      in_specs=[
          pl.BlockSpec((None, None, kv_tab.shape[2]), lambda i, j, h: (j, i, 0)),
          pl.BlockSpec((None, bq, None, d), lambda i, j, h: (j, i, h, 0)),
          pl.BlockSpec((None, lk, None, d), lambda i, j, h: (j, 0, lax.div(h, g), 0)),
          pl.BlockSpec((None, lk, None, d), lambda i, j, h: (j, 0, lax.div(h, g), 0)),
          pl.BlockSpec((None, bq, None, d), lambda i, j, h: (j, i, h, 0)),
          pl.BlockSpec((None, None, bq), lambda i, j, h: (j, h, i)),
          pl.BlockSpec((None, None, bq), lambda i, j, h: (j, h, i)),
      ] + _token_specs(st, pl.BlockSpec((None, bq), lambda i, j, h: (j, i)),
                       pl.BlockSpec((None, lk), lambda i, j, h: (j, 0))),
      out_specs=pl.BlockSpec((None, bq, None, d), lambda i, j, h: (j, i, h, 0)),
      out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
      compiler_params=cp,
      interpret=st.interpret,
      name="flash_attention_dq",
  )(kv_tab, q, k, v, do, lse, delta, *_tokens(aux, st))

  dk, dv = pl.pallas_call(
      functools.partial(_dkv_kernel, st=st),
      grid=(nk, b, hkv),
      in_specs=[
          pl.BlockSpec((None, None, q_tab.shape[2]), lambda i, j, h: (j, i, 0)),
          pl.BlockSpec((None, lq, g, d), lambda i, j, h: (j, 0, h, 0)),
          pl.BlockSpec((None, bk, None, d), lambda i, j, h: (j, i, h, 0)),
          pl.BlockSpec((None, bk, None, d), lambda i, j, h: (j, i, h, 0)),
          pl.BlockSpec((None, lq, g, d), lambda i, j, h: (j, 0, h, 0)),
          pl.BlockSpec((None, g, lq), lambda i, j, h: (j, h, 0)),
          pl.BlockSpec((None, g, lq), lambda i, j, h: (j, h, 0)),
      ] + _token_specs(st, pl.BlockSpec((None, lq), lambda i, j, h: (j, 0)),
                       pl.BlockSpec((None, bk), lambda i, j, h: (j, i))),
      out_specs=[pl.BlockSpec((None, bk, None, d), lambda i, j, h: (j, i, h, 0)),
                 pl.BlockSpec((None, bk, None, d), lambda i, j, h: (j, i, h, 0))],
      out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
      compiler_params=cp,
      interpret=st.interpret,
      name="flash_attention_dkv",
  )(q_tab, q, k, v, do, lse, delta, *_tokens(aux, st))
  return dq, dk, dv


_core = C.make_core(_fwd, _bwd)


# -------------------------------------------------------------------------------------------------- wrapper


def _table(vis):
  """[b, rows, cols] visibility -> int32 [b, rows, 1 + cols]: count first, then the visible column ids."""
  idx, cnt = tiles.block_lists(vis)
  return jnp.concatenate([cnt[..., None], idx], axis=-1)


def _fit_block(block: int, length: int) -> int:
  return min(block, max(_MIN_BLOCK, pl.next_power_of_2(length)))


def flash_attention(q, k, v, *, causal=True, sm_scale=None, q_positions=None, kv_positions=None,
                    q_segment_ids=None, kv_segment_ids=None, sliding_window=None, logits_soft_cap=None,
                    return_lse=False, interpret=False, block_q: int = DEFAULT_BLOCK_Q,
                    block_k: int = DEFAULT_BLOCK_K, block_q_bwd: int = DEFAULT_BLOCK_Q_BWD,
                    block_k_bwd: int = DEFAULT_BLOCK_K_BWD, num_warps: int | None = None,
                    num_warps_bwd: int | None = None, num_stages: int = 2):
  """Same contract as `pallas_kernels.flash_attention`. Block sizes must be powers of two >= 16 (Triton tile
  shapes); they are clipped to the (power-of-two rounded) sequence lengths. A head_dim that is not a power of
  two is zero-padded. interpret=True runs the kernels in the Pallas interpreter (CPU)."""
  inp = C.prepare(q, k, v, causal=causal, sm_scale=sm_scale, q_positions=q_positions,
                  kv_positions=kv_positions, q_segment_ids=q_segment_ids, kv_segment_ids=kv_segment_ids,
                  sliding_window=sliding_window, logits_soft_cap=logits_soft_cap)
  for name, val in (("block_q", block_q), ("block_k", block_k), ("block_q_bwd", block_q_bwd),
                    ("block_k_bwd", block_k_bwd)):
    C.check_block(name, val, power_of_two=True, minimum=_MIN_BLOCK, implementation=NAME)
  b, q_len, hq, d = q.shape
  kv_len, hkv = k.shape[1], k.shape[2]
  bq, bk = _fit_block(block_q, q_len), _fit_block(block_k, kv_len)
  bq_b, bk_b = _fit_block(block_q_bwd, q_len), _fit_block(block_k_bwd, kv_len)
  q_pad, kv_pad = C.round_up(q_len, max(bq, bq_b)), C.round_up(kv_len, max(bk, bk_b))
  tok, params = C.pad_tokens(inp, q_pad, kv_pad)
  d_pad = max(_MIN_BLOCK, pl.next_power_of_2(d))

  vis_fwd = C.visibility(inp, bq, bk, q_pad // bq, kv_pad // bk)
  vis_bwd = vis_fwd if (bq_b, bk_b) == (bq, bk) else C.visibility(inp, bq_b, bk_b, q_pad // bq_b, kv_pad // bk_b)
  aux = (tok.q_positions, tok.kv_positions, tok.q_segment_ids, tok.kv_segment_ids,
         _table(vis_fwd), _table(jnp.swapaxes(vis_bwd, 1, 2)), _table(vis_bwd))
  default_warps = 4 if d_pad <= 64 else 8
  static = _Static(params=params, block_q=bq, block_k=bk, block_q_bwd=bq_b, block_k_bwd=bk_b, group=hq // hkv,
                   num_warps=num_warps or default_warps, num_warps_bwd=num_warps_bwd or default_warps,
                   num_stages=num_stages, interpret=bool(interpret))

  pad = lambda x, n: C.pad_axis(C.pad_axis(x, 1, n), 3, d_pad)
  o, lse = _core(static, pad(q, q_pad), pad(k, kv_pad), pad(v, kv_pad), aux)
  o = o[:, :q_len, :, :d]
  if not return_lse:
    return o
  return o, lse[:, :, :q_len]
