"""Paged attention in plain jnp/lax ("xla"): the CPU default and the baseline of the benchmarks.

Both ops run the work plan of `_common` (items of up to block_q query rows of one sequence, each with its
split-K page ranges). All (item, split) pairs advance together through a `lax.fori_loop` whose trip count is
dynamic (the longest split's page count / pages_per_chunk): each iteration gathers only the next
`pages_per_chunk` pages of every split through the page table, so the cost follows the live lengths, not the
cache capacity, and the ragged op never forms a dense [tokens x all keys] score matrix (each item reads only
its own sequence's pages, from its window start to its last row). Online softmax in float32 per split;
splits are merged by log-sum-exp. Matmul operands stay in the input dtype with float32 accumulation.
Gathered slots that are not visible are zeroed, so whatever unused slots hold never reaches the output.
A quantized pool (k_scales / v_scales, see _quant.py) is dequantized chunk by chunk: each iteration converts
only the pages it has just gathered (to q's dtype), never the pool.
"""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax

from pallas_kernels import decode_common as C
from pallas_kernels.lse import merge_partials, normalize, online_step
from pallas_kernels.op import always_available
from pallas_kernels.paged_attention import _common as P
from pallas_kernels.paged_attention import _quant as Q

NAME = "xla"
DEFAULT_KEYS_PER_CHUNK = 256
DEFAULT_BLOCK_Q = 8
_MAX_ITERATIONS = 8  # num_splits=None: split until the sequential loop has about this many iterations


unavailable_reason = always_available


def attend_plan(q_items, k_pages, v_pages, page_table, plan: P.Plan, params: C.ScoreParams, pages_per_chunk: int,
                k_scales=None, v_scales=None):
  """q_items [I, bq, hq, d] -> (o float32 [I, bq, hq, d], lse float32 [I, bq, hq]) over each item's pages."""
  num_items, bq, hq, d = q_items.shape
  num_pages, ps, hkv, _ = k_pages.shape
  pps = page_table.shape[1]
  g = hq // hkv
  S, ppc = plan.num_splits, pages_per_chunk
  qx = q_items.reshape(num_items, bq, hkv, g, d)
  qpos = plan.pos0[:, None] + jnp.arange(bq, dtype=jnp.int32)[None, :]  # [I, bq]
  page_table = C.int32(page_table)
  k_lay, v_lay = Q.layout(k_pages, k_scales, "k_scales"), Q.layout(v_pages, v_scales, "v_scales")

  def body(c, carry):
    m, l, acc = carry
    j = c * ppc + jnp.arange(ppc, dtype=jnp.int32)
    in_split = j[None, None, :] < plan.split_pages[:, :, None]  # [I, S, ppc]
    lp = plan.split_first[:, :, None] + j[None, None, :]
    phys = page_table[plan.seq[:, None, None], jnp.clip(lp, 0, pps - 1)]
    phys = jnp.clip(phys, 0, num_pages - 1)
    kpos = (lp[..., None] * ps + jnp.arange(ps, dtype=jnp.int32)).reshape(num_items, S, ppc * ps)
    kvalid = (jnp.repeat(in_split, ps, axis=2) & (kpos >= plan.key_lo[:, None, None])
              & (kpos <= plan.key_hi[:, None, None]))  # [I, S, C]
    kt = Q.dequant_pages(k_pages, k_scales, k_lay, phys, q_items.dtype).reshape(num_items, S, ppc * ps, hkv, d)
    vt = Q.dequant_pages(v_pages, v_scales, v_lay, phys, q_items.dtype).reshape(num_items, S, ppc * ps, hkv, d)
    kt = jnp.where(kvalid[..., None, None], kt, jnp.zeros((), kt.dtype))
    vt = jnp.where(kvalid[..., None, None], vt, jnp.zeros((), vt.dtype))
    vis = kvalid[:, :, None, :] & (kpos[:, :, None, :] <= qpos[:, None, :, None])  # [I, S, bq, C]
    if params.sliding_window is not None:
      vis = vis & (qpos[:, None, :, None] - kpos[:, :, None, :] < params.sliding_window)
    s = jnp.einsum("iqhgd,ischd->isqhgc", qx, kt, preferred_element_type=jnp.float32) * params.sm_scale
    s, _ = C.soft_cap(s, params)
    s = jnp.where(vis[:, :, :, None, None, :], s, -jnp.inf)
    m_new, l, p, corr = online_step(m, l, s)
    pv = jnp.einsum("isqhgc,ischd->isqhgd", p.astype(vt.dtype), vt, preferred_element_type=jnp.float32)
    acc = corr[..., None] * acc + pv
    return m_new, l, acc

  shape = (num_items, S, bq, hkv, g)
  init = (jnp.full(shape, -jnp.inf, jnp.float32), jnp.zeros(shape, jnp.float32),
          jnp.zeros(shape + (d,), jnp.float32))
  n_iter = (jnp.max(plan.split_pages) + ppc - 1) // ppc
  m, l, acc = lax.fori_loop(0, n_iter, body, init)
  o, lse = merge_partials(*normalize(acc, l, m), axis=1)  # [I, bq, hkv, g, d], [I, bq, hkv, g]
  return o.reshape(num_items, bq, hq, d), lse.reshape(num_items, bq, hq)


def _pages_per_chunk(page_size: int, keys_per_chunk: int) -> int:
  return max(1, keys_per_chunk // page_size)


def _default_splits(max_pages: int, ppc: int) -> int:
  return max(1, min(max_pages, C.cdiv(max_pages, ppc * _MAX_ITERATIONS)))


def paged_attention(q, k_pages, v_pages, page_table, kv_lens, *, sm_scale=None, sliding_window=None,
                    logits_soft_cap=None, num_splits=None, return_lse=False, interpret=False,
                    keys_per_chunk: int = DEFAULT_KEYS_PER_CHUNK, k_scales=None, v_scales=None):
  """Same contract as `pallas_kernels.paged_attention`; keys_per_chunk sets the pages gathered per loop
  iteration (rounded down to whole pages, at least one)."""
  del interpret
  C.check_block("keys_per_chunk", keys_per_chunk, implementation=NAME)
  params = C.score_params(q.shape[-1], sm_scale, sliding_window, logits_soft_cap)
  ppc = _pages_per_chunk(k_pages.shape[1], keys_per_chunk)
  attend = lambda q_items, plan: attend_plan(q_items, k_pages, v_pages, page_table, plan, params, ppc,
                                             k_scales=k_scales, v_scales=v_scales)
  return P.run_decode(attend, q, k_pages, page_table, kv_lens, params,
                      splits=lambda max_pages: num_splits or _default_splits(max_pages, ppc), return_lse=return_lse)


def ragged_paged_attention(q, k_pages, v_pages, page_table, kv_lens, cu_q_lens, num_seqs, *, sm_scale=None,
                           sliding_window=None, logits_soft_cap=None, return_lse=False, interpret=False,
                           block_q: int = DEFAULT_BLOCK_Q, num_splits: int | None = None,
                           keys_per_chunk: int = DEFAULT_KEYS_PER_CHUNK, k_scales=None, v_scales=None):
  """Same contract as `pallas_kernels.ragged_paged_attention`. block_q: query rows per item (a decode token
  is an item of its own, a prefill chunk of q_len rows is cdiv(q_len, block_q) items); num_splits: split-K
  ranges per item (None: 1); keys_per_chunk as in paged_attention."""
  del interpret
  C.check_block("block_q", block_q, implementation=NAME)
  C.check_block("keys_per_chunk", keys_per_chunk, implementation=NAME)
  if num_splits is not None:
    C.check_block("num_splits", num_splits, implementation=NAME)
  params = C.score_params(q.shape[-1], sm_scale, sliding_window, logits_soft_cap)
  ppc = _pages_per_chunk(k_pages.shape[1], keys_per_chunk)
  attend = lambda q_items, plan: attend_plan(q_items, k_pages, v_pages, page_table, plan, params, ppc,
                                             k_scales=k_scales, v_scales=v_scales)
  return P.run_ragged(attend, q, k_pages, page_table, kv_lens, cu_q_lens, num_seqs, params, block_q=block_q,
                      num_splits=num_splits, return_lse=return_lse)
