"""Paged attention for NVIDIA GPUs in Pallas, Triton-style ("pallas_gpu"); also the kernel of
decode_attention's pallas_gpu (a contiguous cache viewed as pages).

Why the Triton path and not Mosaic GPU: see pallas_kernels/flash_attention/gpu.py (same reasoning: it runs
under the generic interpreter on CPU, so the test suite checks it, and lowers to Triton IR without a GPU).

One kernel serves paged_attention, ragged_paged_attention and decode_attention through the work plan of
`_common` (items of up to block_q query rows of one sequence, each with num_splits page ranges):

  grid (item, kv_head, split). A program holds the item's queries of one kv head's GQA group as one tile of
  g * block_q rows (padded to a power of two >= 16, Triton's dot minimum) and walks the keys of its split,
  block_k tokens per iteration: the page of every token comes from the item's page-table row (a gather of
  block_k int32 from a row that stays in L1), and K/V rows are loaded with page-indexed pointers and a mask,
  so pages beyond the split, before the window or past kv_len are never touched, and a partially filled last
  page costs only masked lanes. Pages may sit anywhere in the pool and need not be a power of two in size.
  Online softmax in base 2, float32 statistics and accumulator, P cast to the input dtype for P V.
  Each program writes a normalised partial output and its lse; the wrapper merges splits by log-sum-exp
  (FlashDecoding) and scatters item rows back to token order.

A quantized pool (int8 / float8_e4m3fn pages with float32 scales, see _quant.py): each K/V tile is loaded
in its stored dtype, its scale tile is gathered with the same page/slot indices, and the product is cast to
q's dtype right before the dot: only the block_k rows in registers are ever dequantized.

Limits: head_dim must be a power of two >= 16 (Triton tile shapes; padding the head dim would copy the
whole page pool); block_k a power of two >= 16.
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

from pallas_kernels import decode_common as C
from pallas_kernels.lse import merge_partials
from pallas_kernels.op import requires_backend
from pallas_kernels.paged_attention import _common as P
from pallas_kernels.paged_attention import _quant as Q

NAME = "pallas_gpu"
DEFAULT_BLOCK_K = 32
DEFAULT_BLOCK_Q = 16
_MIN_DIM = 16
_LOG2E = math.log2(math.e)
_LN2 = math.log(2.0)


unavailable_reason = requires_backend("gpu", NAME)


@dataclasses.dataclass(frozen=True)
class _Static:
  params: C.ScoreParams
  block_q: int
  block_k: int
  page_size: int
  pages_per_seq: int
  rows: int  # padded tile rows (g * block_q rounded up)
  num_warps: int
  num_stages: int
  interpret: bool
  k_lay: Q.ScaleLayout | None = None
  v_lay: Q.ScaleLayout | None = None


def _precision(dtype):
  return lax.Precision.HIGHEST if dtype == jnp.float32 else None


def _load_tile(ref, s_ref, lay, page, slot, dcol, mask, dtype):
  """block_k rows of one kv head's pages (masked gather), dequantized with their scales when quantized."""
  x = plgpu.load(ref.at[page[:, None], slot[:, None], dcol], mask=mask, other=0)
  if lay is None:
    return x
  zero = jnp.zeros_like
  if lay.kind == "token":
    idx = (page[:, None], slot[:, None], zero(dcol))
  else:
    idx = (lax.div(page, lay.pages_per_scale)[:, None], zero(slot)[:, None], dcol)
  scale = plgpu.load(s_ref.at[idx], mask=mask, other=0.0)
  return (x.astype(jnp.float32) * scale).astype(dtype)


def _kernel(meta_ref, pt_ref, q_ref, k_ref, v_ref, *refs, st: _Static):
  scale_refs = refs[:-2]
  ks_ref, vs_ref = (scale_refs if scale_refs else (None, None))
  o_ref, lse_ref = refs[-2:]
  p = st.params
  bk, ps = st.block_k, st.page_size
  prec = _precision(q_ref.dtype)
  pos0, key_lo, key_hi, first, npages = (meta_ref[j] for j in range(5))
  lo = jnp.maximum(first * ps, key_lo)  # this split's keys: its pages intersected with the item's range
  hi = jnp.minimum((first + npages) * ps - 1, key_hi)
  n_iter = jnp.where(hi >= lo, (hi - lo + bk) // bk, 0)
  q = q_ref[...]
  d = q.shape[-1]
  dcol = jnp.arange(d, dtype=jnp.int32)[None, :]
  q_pos = pos0 + lax.rem(jnp.arange(st.rows, dtype=jnp.int32), st.block_q)

  def body(t, carry):
    m, l, acc = carry
    tok = lo + t * bk + jnp.arange(bk, dtype=jnp.int32)
    valid = tok <= hi
    page = pt_ref[jnp.minimum(lax.div(tok, ps), st.pages_per_seq - 1)]
    slot = lax.rem(tok, ps)
    # All-array indexers (a gather of block_k rows): Triton pointer arithmetic; the interpreter's gather.
    mask = jnp.broadcast_to(valid[:, None], (bk, d))
    k = _load_tile(k_ref, ks_ref, st.k_lay, page, slot, dcol, mask, q.dtype)
    v = _load_tile(v_ref, vs_ref, st.v_lay, page, slot, dcol, mask, q.dtype)
    s = plgpu.dot(q, k, trans_b=True, precision=prec) * p.sm_scale
    s, _ = C.soft_cap(s, p)
    s = s * _LOG2E
    vis = valid[None, :] & (tok[None, :] <= q_pos[:, None])
    if p.sliding_window is not None:
      vis = vis & (q_pos[:, None] - tok[None, :] < p.sliding_window)
    s = jnp.where(vis, s, -jnp.inf)
    m_new = jnp.maximum(m, jnp.max(s, axis=1))
    m_safe = jnp.where(m_new == -jnp.inf, 0.0, m_new)
    pr = jnp.exp2(s - m_safe[:, None])
    corr = jnp.exp2(m - m_safe)
    l = corr * l + jnp.sum(pr, axis=1)
    acc = corr[:, None] * acc + plgpu.dot(pr.astype(v.dtype), v, precision=prec)
    return m_new, l, acc

  init = (jnp.full((st.rows,), -jnp.inf, jnp.float32), jnp.zeros((st.rows,), jnp.float32),
          jnp.zeros((st.rows, q.shape[-1]), jnp.float32))
  m, l, acc = lax.fori_loop(0, n_iter, body, init)
  empty = l == 0.0
  l_safe = jnp.where(empty, 1.0, l)
  o_ref[...] = acc / l_safe[:, None]
  lse_ref[...] = jnp.where(empty, -jnp.inf, (m + jnp.log2(l_safe)) * _LN2)


def check_head_dim(head_dim: int):
  if head_dim < _MIN_DIM or head_dim & (head_dim - 1):
    raise ValueError(f"head_dim={head_dim} for implementation={NAME!r}: must be a power of two >= {_MIN_DIM} "
                     "(Triton tile shapes)")


def _scale_spec(scales, lay):
  if lay.kind == "token":
    return pl.BlockSpec((scales.shape[0], scales.shape[1], None, 1), lambda i, h, s: (0, 0, h, 0))
  return pl.BlockSpec((scales.shape[0], 1, None, scales.shape[3]), lambda i, h, s: (0, 0, h, 0))


def attend_plan(q_items, k_pages, v_pages, page_table, plan: P.Plan, params: C.ScoreParams, *, block_k: int,
                num_warps: int | None, num_stages: int, interpret: bool, k_scales=None, v_scales=None):
  """q_items [I, bq, hq, d] -> (o float32 [I, bq, hq, d], lse float32 [I, bq, hq])."""
  num_items, bq, hq, d = q_items.shape
  num_pages, ps, hkv, _ = k_pages.shape
  pps = page_table.shape[1]
  g = hq // hkv
  S = plan.num_splits
  rows = max(_MIN_DIM, pl.next_power_of_2(g * bq))
  # q tile of item i, kv head h: rows (group member, item row) = gi * bq + r, padded.
  qx = q_items.reshape(num_items, bq, hkv, g, d).transpose(0, 2, 3, 1, 4).reshape(num_items, hkv, g * bq, d)
  qx = C.pad_axis(qx, 2, rows)
  item_pages = jnp.clip(C.int32(page_table)[plan.seq], 0, num_pages - 1)  # [I, pps]
  bcast = lambda x: jnp.broadcast_to(x[:, None], (num_items, S))
  zeros = jnp.zeros((num_items, S), jnp.int32)
  meta = jnp.stack([bcast(plan.pos0), bcast(plan.key_lo), bcast(plan.key_hi), plan.split_first, plan.split_pages,
                    zeros, zeros, zeros], axis=-1).astype(jnp.int32)  # [I, S, 8]
  st = _Static(params=params, block_q=bq, block_k=block_k, page_size=ps, pages_per_seq=pps, rows=rows,
               num_warps=num_warps or 4, num_stages=num_stages, interpret=bool(interpret),
               k_lay=Q.layout(k_pages, k_scales, "k_scales"), v_lay=Q.layout(v_pages, v_scales, "v_scales"))
  scale_specs = [] if st.k_lay is None else [_scale_spec(k_scales, st.k_lay), _scale_spec(v_scales, st.v_lay)]
  scale_args = [] if st.k_lay is None else [k_scales, v_scales]
  o, lse = pl.pallas_call(
      functools.partial(_kernel, st=st),
      grid=(num_items, hkv, S),
      in_specs=[
          pl.BlockSpec((None, None, 8), lambda i, h, s: (i, s, 0)),
          pl.BlockSpec((None, pps), lambda i, h, s: (i, 0)),
          pl.BlockSpec((None, None, rows, d), lambda i, h, s: (i, h, 0, 0)),
          pl.BlockSpec((num_pages, ps, None, d), lambda i, h, s: (0, 0, h, 0)),
          pl.BlockSpec((num_pages, ps, None, d), lambda i, h, s: (0, 0, h, 0)),
      ] + scale_specs,
      out_specs=[pl.BlockSpec((None, None, None, rows, d), lambda i, h, s: (i, s, h, 0, 0)),
                 pl.BlockSpec((None, None, None, rows), lambda i, h, s: (i, s, h, 0))],
      out_shape=[jax.ShapeDtypeStruct((num_items, S, hkv, rows, d), jnp.float32),
                 jax.ShapeDtypeStruct((num_items, S, hkv, rows), jnp.float32)],
      compiler_params=plgpu.CompilerParams(num_warps=st.num_warps, num_stages=num_stages),
      interpret=st.interpret,
      name="paged_attention",
  )(meta, item_pages, qx, k_pages, v_pages, *scale_args)
  o, lse = merge_partials(o, lse, axis=1)  # [I, hkv, rows, d], [I, hkv, rows]
  o = o[:, :, :g * bq].reshape(num_items, hkv, g, bq, d).transpose(0, 3, 1, 2, 4).reshape(num_items, bq, hq, d)
  lse = lse[:, :, :g * bq].reshape(num_items, hkv, g, bq).transpose(0, 3, 1, 2).reshape(num_items, bq, hq)
  return o, lse


def _check_blocks(block_k, block_q=1):
  C.check_block("block_k", block_k, implementation=NAME, minimum=_MIN_DIM, power_of_two=True)
  C.check_block("block_q", block_q, implementation=NAME)


def paged_attention(q, k_pages, v_pages, page_table, kv_lens, *, sm_scale=None, sliding_window=None,
                    logits_soft_cap=None, num_splits=None, return_lse=False, interpret=False,
                    block_k: int = DEFAULT_BLOCK_K, num_warps: int | None = None, num_stages: int = 2,
                    k_scales=None, v_scales=None):
  """Same contract as `pallas_kernels.paged_attention`. block_k: keys per loop iteration (power of two >= 16,
  independent of the page size). num_splits=None: enough splits for ~2 waves of programs on an H100."""
  _check_blocks(block_k)
  check_head_dim(q.shape[-1])
  params = C.score_params(q.shape[-1], sm_scale, sliding_window, logits_soft_cap)
  parallel, ps = q.shape[0] * k_pages.shape[2], k_pages.shape[1]
  splits = lambda max_pages: num_splits or C.default_num_splits(parallel, C.cdiv(max_pages * ps, block_k))
  attend = lambda q_items, plan: attend_plan(q_items, k_pages, v_pages, page_table, plan, params, block_k=block_k,
                                             num_warps=num_warps, num_stages=num_stages, interpret=interpret,
                                             k_scales=k_scales, v_scales=v_scales)
  return P.run_decode(attend, q, k_pages, page_table, kv_lens, params, splits=splits, return_lse=return_lse)


def ragged_paged_attention(q, k_pages, v_pages, page_table, kv_lens, cu_q_lens, num_seqs, *, sm_scale=None,
                           sliding_window=None, logits_soft_cap=None, return_lse=False, interpret=False,
                           block_q: int = DEFAULT_BLOCK_Q, block_k: int = DEFAULT_BLOCK_K,
                           num_splits: int | None = None, num_warps: int | None = None, num_stages: int = 2,
                           k_scales=None, v_scales=None):
  """Same contract as `pallas_kernels.ragged_paged_attention`. block_q: query rows per item (g * block_q
  rows per program tile); num_splits: split-K ranges per item (None: 1, since a step's items usually fill
  the GPU; raise it for few long sequences)."""
  _check_blocks(block_k, block_q)
  if num_splits is not None:
    C.check_block("num_splits", num_splits, implementation=NAME)
  check_head_dim(q.shape[-1])
  params = C.score_params(q.shape[-1], sm_scale, sliding_window, logits_soft_cap)
  attend = lambda q_items, plan: attend_plan(q_items, k_pages, v_pages, page_table, plan, params, block_k=block_k,
                                             num_warps=num_warps, num_stages=num_stages, interpret=interpret,
                                             k_scales=k_scales, v_scales=v_scales)
  return P.run_ragged(attend, q, k_pages, page_table, kv_lens, cu_q_lens, num_seqs, params, block_q=block_q,
                      num_splits=num_splits, return_lse=return_lse)
