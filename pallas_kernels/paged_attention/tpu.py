"""Paged attention for TPUs in Pallas Mosaic TPU ("pallas_tpu"); also the kernel of decode_attention's
pallas_tpu (a contiguous cache viewed as pages).

One kernel serves paged_attention, ragged_paged_attention and decode_attention through the work plan of
`_common` (items of up to block_q query rows of one sequence, each with num_splits page ranges):

  grid (item, split, t), t walking the split's pages pages_per_block at a time. The page table comes in by
  scalar prefetch (PrefetchScalarGridSpec): the K/V BlockSpec index maps read, from SMEM, the physical pages
  of the split's next pages, so each grid step DMAs pages_per_block pages (each with all kv heads: a
  [page_size * kv_heads, head_dim] block of the pool viewed as [num_pages, page_size * kv_heads, head_dim],
  a free reshape; the pool is passed pages_per_block times, one BlockSpec per page) from wherever they sit
  in the pool. Past the split's page count the index maps repeat the last page, so the pipeline issues no
  new DMA, and `pl.when` skips the compute: pages beyond kv_len, before the window or in other splits are
  never read. The last grid axis is dynamic (the longest split of this call, not the table's capacity), so
  short sequences in a large page table cost no empty steps. Splits are "parallel" grid steps (megacore);
  partials are merged by log-sum-exp.

  The block holds every kv head, with rows ordered (token, kv head). Rather than strided per-head slices,
  one [hq * block_q, page_size * kv_heads] score tile is computed for all query heads at once and the
  (query head, key head) pairs that do not belong together are masked (the "GQA mask"), so P V gives each
  query head exactly its own values. This costs kv_heads x the minimal MXU work, which decode (a few query
  rows per key; memory-bound by a wide margin) does not notice; for prefill-heavy steps with many kv heads a
  per-head layout would be faster (future work).

A quantized pool (int8 / float8_e4m3fn pages with float32 scales, see _quant.py) adds one scale block per page
block, DMA'd by the same index maps: per-token scales as [page_size * kv_heads, 1] (the pool's scales viewed
as [num_pages, page_size * kv_heads, 1], a free reshape), per-channel scales as [kv_heads, head_dim] spread
to the block's (token, kv head) rows by a static select over kv heads. The page block is dequantized in VMEM
(float32 product, cast to q's dtype) right before its dot; the pool in HBM stays quantized.

Mosaic layout rules, as in flash_attention/tpu.py: per-row values (query positions, m, l, lse) are kept
lane-replicated ([rows, 128]) and per-column values (key offsets, key heads) sublane-replicated
([8, cols]); every block's last two dims equal the array's, so any page size / head count / head_dim is
legal on hardware. Small constant "pattern" arrays (row -> query token / kv head, column -> key token / kv
head) avoid vector integer division in the kernel. interpret=True runs it through pltpu.InterpretParams.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels import decode_common as C
from pallas_kernels.lse import merge_partials
from pallas_kernels.mosaic import LANES, SUBLANES
from pallas_kernels.mosaic import interpret_params as _interpret_params
from pallas_kernels.mosaic import lanes_to as _lanes_to
from pallas_kernels.mosaic import mxu_dot as _dot
from pallas_kernels.op import requires_backend
from pallas_kernels.paged_attention import _common as P
from pallas_kernels.paged_attention import _quant as Q

NAME = "pallas_tpu"
DEFAULT_BLOCK_Q = 8
DEFAULT_KEYS_PER_STEP = 256  # pages_per_block=None: about this many keys per grid step


unavailable_reason = requires_backend("tpu", NAME, interpret_mode="TPU interpret mode")


@dataclasses.dataclass(frozen=True)
class _Static:
  params: C.ScoreParams
  page_size: int
  pages_per_seq: int
  num_splits: int
  pages_per_block: int
  interpret: object  # False or a pltpu.InterpretParams
  k_lay: Q.ScaleLayout | None = None
  v_lay: Q.ScaleLayout | None = None
  kv_heads: int = 1


def _dequant(x, s_ref, lay, kvh_ref, st: _Static, dtype):
  """A [page_size * kv_heads, head_dim] page block as real values (quantized pools) in `dtype`."""
  if lay is None:
    return x
  xf = x.astype(jnp.float32)
  if lay.kind == "token":
    return (xf * s_ref[...]).astype(dtype)  # [cols, 1] broadcast along lanes
  sc = s_ref[...]  # [kv_heads, head_dim]
  row_kvh = _lanes_to(kvh_ref[...], x.shape[1])  # [cols, d]: the kv head of each row
  spread = jnp.zeros(xf.shape, jnp.float32)
  for h in range(st.kv_heads):
    spread = jnp.where(row_kvh == h, sc[h:h + 1, :], spread)
  return (xf * spread).astype(dtype)


def _kernel(pages_ref, meta_ref, split_ref, row_tok_ref, row_kvh_ref, col_tok_ref, col_kvh_ref, key_tok_ref,
            q_ref, *refs, st: _Static):
  del pages_ref
  ppb = st.pages_per_block
  k_refs, v_refs = refs[:ppb], refs[ppb:2 * ppb]
  quant = refs[2 * ppb:-5]
  ks_refs, vs_refs = (quant[:ppb], quant[ppb:2 * ppb]) if quant else ((None,) * ppb, (None,) * ppb)
  kvh_ref = quant[2 * ppb] if len(quant) > 2 * ppb else None
  o_ref, lse_ref, m_sc, l_sc, acc_sc = refs[-5:]
  p = st.params
  i, s, t = pl.program_id(0), pl.program_id(1), pl.program_id(2)
  ps = st.page_size
  sp = i * st.num_splits + s
  first, count = split_ref[2 * sp], split_ref[2 * sp + 1]

  @pl.when(t == 0)
  def _():
    m_sc[...] = jnp.full(m_sc.shape, -jnp.inf, jnp.float32)
    l_sc[...] = jnp.zeros(l_sc.shape, jnp.float32)
    acc_sc[...] = jnp.zeros(acc_sc.shape, jnp.float32)

  def page(j):
    pos0, key_lo, key_hi = meta_ref[3 * i], meta_ref[3 * i + 1], meta_ref[3 * i + 2]
    base = (first + t * ppb + j) * ps
    q = q_ref[...]
    k = _dequant(k_refs[j][...], ks_refs[j], st.k_lay, kvh_ref, st, q.dtype)
    v = _dequant(v_refs[j][...], vs_refs[j], st.v_lay, kvh_ref, st, q.dtype)
    cols = k.shape[0]
    # keys: positions along lanes ([8, cols]) for the score mask, along sublanes ([cols, 128]) for V rows.
    key_pos = base + col_tok_ref[...]
    key_ok = (key_pos >= key_lo) & (key_pos <= key_hi)
    v_pos = base + key_tok_ref[...]
    v_ok = (v_pos >= key_lo) & (v_pos <= key_hi)
    v = jnp.where(_lanes_to(v_ok, v.shape[1]), v, jnp.zeros((), v.dtype))
    q_pos = _lanes_to(pos0 + row_tok_ref[...], cols)
    vis = (key_ok[0:1, :] & (_lanes_to(row_kvh_ref[...], cols) == col_kvh_ref[0:1, :])
           & (key_pos[0:1, :] <= q_pos))
    if p.sliding_window is not None:
      vis = vis & (q_pos - key_pos[0:1, :] < p.sliding_window)
    sc = _dot(q, k, trans_b=True) * p.sm_scale
    sc, _ = C.soft_cap(sc, p)
    sc = jnp.where(vis, sc, -jnp.inf)
    m_prev = m_sc[...]
    m_next = jnp.maximum(m_prev, jnp.max(sc, axis=1)[:, None])
    m_safe = jnp.where(m_next == -jnp.inf, 0.0, m_next)
    pr = jnp.exp(sc - _lanes_to(m_safe, cols))
    corr = jnp.exp(m_prev - m_safe)
    l_sc[...] = corr * l_sc[...] + jnp.sum(pr, axis=1)[:, None]
    m_sc[...] = m_next
    acc_sc[...] = acc_sc[...] * _lanes_to(corr, acc_sc.shape[1]) + _dot(pr.astype(v.dtype), v)

  for j in range(ppb):
    pl.when(t * ppb + j < count)(functools.partial(page, j))

  @pl.when(t == pl.num_programs(2) - 1)
  def _():
    l = l_sc[...]
    empty = l == 0.0
    l_safe = jnp.where(empty, 1.0, l)
    o_ref[...] = acc_sc[...] / _lanes_to(l_safe, acc_sc.shape[1])
    lse_ref[...] = jnp.where(empty, -jnp.inf, m_sc[...] + jnp.log(l_safe))


def _patterns(bq: int, g: int, ps: int, hkv: int):
  """Row r = (query head h, item row j) = h * bq + j; column c = (key token, kv head) = tok * hkv + kvh."""
  rows, cols = bq * g * hkv, ps * hkv
  r = jnp.arange(rows, dtype=jnp.int32)
  c = jnp.arange(cols, dtype=jnp.int32)
  lanes = lambda x: jnp.broadcast_to(x[:, None], (x.shape[0], LANES))
  subl = lambda x: jnp.broadcast_to(x[None, :], (SUBLANES, x.shape[0]))
  return lanes(r % bq), lanes(r // (bq * g)), subl(c // hkv), subl(c % hkv), lanes(c // hkv)


def attend_plan(q_items, k_pages, v_pages, page_table, plan: P.Plan, params: C.ScoreParams, *, interpret,
                pages_per_block: int | None = None, k_scales=None, v_scales=None):
  """q_items [I, bq, hq, d] -> (o float32 [I, bq, hq, d], lse float32 [I, bq, hq])."""
  num_items, bq, hq, d = q_items.shape
  num_pages, ps, hkv, _ = k_pages.shape
  pps = page_table.shape[1]
  g = hq // hkv
  S = plan.num_splits
  ppb = min(pages_per_block or max(1, DEFAULT_KEYS_PER_STEP // ps), plan.max_pages_per_split)
  rows, cols = hq * bq, ps * hkv
  qx = q_items.transpose(0, 2, 1, 3).reshape(num_items, rows, d)
  kx = k_pages.reshape(num_pages, cols, d)
  vx = v_pages.reshape(num_pages, cols, d)
  item_pages = jnp.clip(C.int32(page_table)[plan.seq], 0, num_pages - 1).reshape(-1)  # [I * pps]
  meta = jnp.stack([plan.pos0, plan.key_lo, plan.key_hi], axis=-1).reshape(-1)  # [I * 3]
  split = jnp.stack([plan.split_first, plan.split_pages], axis=-1).reshape(-1)  # [I * S * 2]
  k_lay, v_lay = Q.layout(k_pages, k_scales, "k_scales"), Q.layout(v_pages, v_scales, "v_scales")
  st = _Static(params=params, page_size=ps, pages_per_seq=pps, num_splits=S, pages_per_block=ppb,
               interpret=_interpret_params(interpret), k_lay=k_lay, v_lay=v_lay, kv_heads=hkv)

  def page_map(j, i, s, t, pages_ref, meta_ref, split_ref):
    """Physical page of the split's (t * ppb + j)-th page; past the count, the last one (no new DMA)."""
    del meta_ref
    sp = i * S + s
    step = jnp.minimum(t * ppb + j, jnp.maximum(split_ref[2 * sp + 1] - 1, 0))
    logical = jnp.clip(split_ref[2 * sp] + step, 0, pps - 1)
    return pages_ref[i * pps + logical], 0, 0

  page_specs = [pl.BlockSpec((None, cols, d), functools.partial(page_map, j)) for j in range(ppb)]
  quant_specs, quant_args = [], []
  for scales, lay in ((k_scales, k_lay), (v_scales, v_lay)):
    if lay is None:
      continue
    if lay.kind == "token":
      quant_args += [scales.reshape(num_pages, cols, 1)] * ppb
      quant_specs += [pl.BlockSpec((None, cols, 1), functools.partial(page_map, j)) for j in range(ppb)]
    else:
      r = lay.pages_per_scale
      # page ids are >= 0: lax.div (no floor-division sign fix-up, which Mosaic cannot lower off a TPU)
      row_map = lambda j, *a: (lambda p, x, y: (p if r == 1 else lax.div(p, r), x, y))(*page_map(j, *a))  # noqa: E731
      quant_args += [scales.reshape(scales.shape[0], hkv, d)] * ppb
      quant_specs += [pl.BlockSpec((None, hkv, d), functools.partial(row_map, j)) for j in range(ppb)]
  if "channel" in (getattr(k_lay, "kind", None), getattr(v_lay, "kind", None)):
    quant_args.append(jnp.broadcast_to((jnp.arange(cols, dtype=jnp.int32) % hkv)[:, None], (cols, LANES)))
    quant_specs.append(pl.BlockSpec((cols, LANES), lambda i, s, t, *_: (0, 0)))
  # Dynamic grid: the last axis only goes as far as the longest split of this call.
  steps = (jnp.maximum(jnp.max(plan.split_pages), 1) + ppb - 1) // ppb

  const = lambda shape: pl.BlockSpec(shape, lambda i, s, t, *_: (0, 0))
  in_specs = [
      const((bq * hq, LANES)), const((bq * hq, LANES)), const((SUBLANES, cols)), const((SUBLANES, cols)),
      const((cols, LANES)),
      pl.BlockSpec((None, rows, d), lambda i, s, t, *_: (i, 0, 0)),
  ] + page_specs + page_specs + quant_specs
  out_specs = [pl.BlockSpec((None, None, rows, d), lambda i, s, t, *_: (i, s, 0, 0)),
               pl.BlockSpec((None, None, rows, LANES), lambda i, s, t, *_: (i, s, 0, 0))]
  o, lse = pl.pallas_call(
      functools.partial(_kernel, st=st),
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=3, grid=(num_items, S, steps), in_specs=in_specs, out_specs=out_specs,
          scratch_shapes=[pltpu.VMEM((rows, LANES), jnp.float32), pltpu.VMEM((rows, LANES), jnp.float32),
                          pltpu.VMEM((rows, d), jnp.float32)]),
      out_shape=[jax.ShapeDtypeStruct((num_items, S, rows, d), jnp.float32),
                 jax.ShapeDtypeStruct((num_items, S, rows, LANES), jnp.float32)],
      compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "arbitrary")),
      interpret=st.interpret,
      name="paged_attention",
  )(item_pages, meta, split, *_patterns(bq, g, ps, hkv), qx, *[kx] * ppb, *[vx] * ppb, *quant_args)
  o, lse = merge_partials(o, lse[..., 0], axis=1)  # [I, rows, d], [I, rows]
  o = o.reshape(num_items, hq, bq, d).transpose(0, 2, 1, 3)
  lse = lse.reshape(num_items, hq, bq).transpose(0, 2, 1)
  return o, lse


def paged_attention(q, k_pages, v_pages, page_table, kv_lens, *, sm_scale=None, sliding_window=None,
                    logits_soft_cap=None, num_splits=None, return_lse=False, interpret=False,
                    pages_per_block: int | None = None, k_scales=None, v_scales=None):
  """Same contract as `pallas_kernels.paged_attention`. pages_per_block: pages DMA'd per grid step (None:
  about 256 keys). num_splits=None: 2 when the batch is small (both
  TensorCores of a megacore chip busy), else 1 (each grid step is one page; splits only add parallelism)."""
  if pages_per_block is not None:
    C.check_block("pages_per_block", pages_per_block, implementation=NAME)
  params = C.score_params(q.shape[-1], sm_scale, sliding_window, logits_soft_cap)
  attend = lambda q_items, plan: attend_plan(q_items, k_pages, v_pages, page_table, plan, params,
                                             interpret=interpret, pages_per_block=pages_per_block,
                                             k_scales=k_scales, v_scales=v_scales)
  return P.run_decode(attend, q, k_pages, page_table, kv_lens, params,
                      splits=lambda _: num_splits or (2 if q.shape[0] < 8 else 1), return_lse=return_lse)


def ragged_paged_attention(q, k_pages, v_pages, page_table, kv_lens, cu_q_lens, num_seqs, *, sm_scale=None,
                           sliding_window=None, logits_soft_cap=None, return_lse=False, interpret=False,
                           block_q: int = DEFAULT_BLOCK_Q, num_splits: int | None = None,
                           pages_per_block: int | None = None, k_scales=None, v_scales=None):
  """Same contract as `pallas_kernels.ragged_paged_attention`. block_q: query rows per item (tile rows
  q_heads * block_q); num_splits: split-K ranges per item (None: 1)."""
  C.check_block("block_q", block_q, implementation=NAME)
  if pages_per_block is not None:
    C.check_block("pages_per_block", pages_per_block, implementation=NAME)
  if num_splits is not None:
    C.check_block("num_splits", num_splits, implementation=NAME)
  params = C.score_params(q.shape[-1], sm_scale, sliding_window, logits_soft_cap)
  attend = lambda q_items, plan: attend_plan(q_items, k_pages, v_pages, page_table, plan, params,
                                             interpret=interpret, pages_per_block=pages_per_block,
                                             k_scales=k_scales, v_scales=v_scales)
  return P.run_ragged(attend, q, k_pages, page_table, kv_lens, cu_q_lens, num_seqs, params, block_q=block_q,
                      num_splits=num_splits, return_lse=return_lse)
