"""Shared pieces of paged_attention and ragged_paged_attention: validation and the work plan.

The work plan is what lets one kernel serve both ops (and decode_attention over a contiguous cache, viewed as
pages): the step's query tokens are cut into *items*, each a block of up to `block_q` consecutive query rows
of ONE sequence (a decode token is an item of one row; a prefill chunk of 100 tokens with block_q 16 is 7
items). Every item knows its sequence, the position of its first row, its valid row count and the sequence's
kv_len, and the range of logical pages it needs (keys from the window start of its first row to its last
row's position), cut into `num_splits` contiguous split ranges (split-K). A kernel instance = (item, split
[, kv head]) walks only its pages and writes a partial (o, lse); partials are merged by log-sum-exp and the
item rows are gathered back to token order (padding tokens get zeros). Everything here is jnp on dynamic
values (num_seqs, lengths), static shapes only: jit-friendly with bucketed shapes.

Number of items, a static bound: sum_s cdiv(q_len_s, block_q) <= cdiv(max_tokens, block_q) + max_seqs - 1
(each sequence adds at most one partial block); ragged_paged_attention uses min(that, max_tokens).
"""

from __future__ import annotations

import dataclasses
import numbers

import jax
import jax.numpy as jnp

from pallas_kernels import decode_common as C
from pallas_kernels.paged_attention import _quant as Q


# ----------------------------------------------------------------------------------------------- validation


def _check_quantized(q, k_pages, v_pages, k_scales, v_scales):
  """A quantized pool: int8 / float8_e4m3fn pages of q's shape rules, each with its float32 scales."""
  if (k_scales is None) != (v_scales is None):
    raise ValueError("k_scales and v_scales must be given together (a quantized pool has both), got "
                     f"k_scales={'None' if k_scales is None else 'an array'}, "
                     f"v_scales={'None' if v_scales is None else 'an array'}")
  for name, pages in (("k_pages", k_pages), ("v_pages", v_pages)):
    C.check_array(pages, name, 4, "[num_pages, page_size, kv_heads, head_dim]")
    if jnp.dtype(pages.dtype).name not in Q.QUANTIZED_DTYPES:
      raise ValueError(f"{name} with scales must be one of {Q.QUANTIZED_DTYPES}, got dtype {pages.dtype}")
  as_q = lambda x: jax.ShapeDtypeStruct(x.shape, q.dtype)  # noqa: E731  (shape rules only; no copy)
  C.check_qkv(q, as_q(k_pages), as_q(v_pages), k_name="k_pages", v_name="v_pages")
  Q.layout(k_pages, k_scales, "k_scales")
  Q.layout(v_pages, v_scales, "v_scales")


def _check_pages(q, k_pages, v_pages, page_table, kv_lens, *, batch_name: str, k_scales=None, v_scales=None):
  if k_scales is not None or v_scales is not None:
    _check_quantized(q, k_pages, v_pages, k_scales, v_scales)
  else:
    C.check_array(k_pages, "k_pages", 4, "[num_pages, page_size, kv_heads, head_dim]", floating=True)
    C.check_array(v_pages, "v_pages", 4, "[num_pages, page_size, kv_heads, head_dim]", floating=True)
    C.check_qkv(q, k_pages, v_pages, k_name="k_pages", v_name="v_pages")
  if k_pages.shape[0] == 0 or k_pages.shape[1] == 0:
    raise ValueError(f"k_pages must hold at least one page of at least one slot, got shape {tuple(k_pages.shape)}")
  C.check_array(page_table, "page_table", 2, f"[{batch_name}, pages_per_seq]", integer=True)
  if page_table.shape[1] == 0:
    raise ValueError(f"page_table must have at least one column, got shape {tuple(page_table.shape)}")
  C.check_array(kv_lens, "kv_lens", 1, f"[{batch_name}]", integer=True)
  C.check_shape(kv_lens, "kv_lens", (page_table.shape[0],), f"[{batch_name}] (page_table's first dim)")


def validate_paged(q, k_pages, v_pages, page_table, kv_lens, *, sm_scale, sliding_window, logits_soft_cap,
                   num_splits, k_scales=None, v_scales=None):
  C.check_array(q, "q", 3, "[batch, q_heads, head_dim]", floating=True)
  _check_pages(q, k_pages, v_pages, page_table, kv_lens, batch_name="batch", k_scales=k_scales, v_scales=v_scales)
  if page_table.shape[0] != q.shape[0]:
    raise ValueError(f"page_table must have shape ({q.shape[0]}, pages_per_seq) [batch, pages_per_seq] "
                     f"(q's batch), got {tuple(page_table.shape)}")
  C.check_options(sm_scale=sm_scale, sliding_window=sliding_window, logits_soft_cap=logits_soft_cap,
                  num_splits=num_splits)


def validate_ragged(q, k_pages, v_pages, page_table, kv_lens, cu_q_lens, num_seqs, *, sm_scale, sliding_window,
                    logits_soft_cap, num_splits=None, k_scales=None, v_scales=None):
  C.check_array(q, "q", 3, "[max_tokens, q_heads, head_dim]", floating=True)
  if q.shape[0] == 0:
    raise ValueError("q must hold at least one token row (max_tokens >= 1)")
  _check_pages(q, k_pages, v_pages, page_table, kv_lens, batch_name="max_seqs", k_scales=k_scales,
               v_scales=v_scales)
  C.check_array(cu_q_lens, "cu_q_lens", 1, "[max_seqs + 1]", integer=True)
  C.check_shape(cu_q_lens, "cu_q_lens", (page_table.shape[0] + 1,), "[max_seqs + 1]")
  if isinstance(num_seqs, bool) or not (isinstance(num_seqs, numbers.Integral) or (
      hasattr(num_seqs, "dtype") and jnp.issubdtype(num_seqs.dtype, jnp.integer) and num_seqs.size == 1)):
    raise ValueError(f"num_seqs must be an int or an int32 scalar array, got {num_seqs!r}")
  C.check_options(sm_scale=sm_scale, sliding_window=sliding_window, logits_soft_cap=logits_soft_cap,
                  num_splits=num_splits)


# ------------------------------------------------------------------------------------------------ work plan


@dataclasses.dataclass
class Plan:
  """Static sizes and per-item int32 tables (see the module docstring)."""
  block_q: int
  num_items: int
  num_splits: int
  max_pages_per_split: int  # static bound on split_pages
  seq: jax.Array          # [I] sequence of the item (0 for unused items)
  pos0: jax.Array         # [I] position of the item's first row
  rows: jax.Array         # [I] valid rows (0 for unused items)
  kv_len: jax.Array       # [I] the sequence's kv_len (clipped to its capacity)
  key_lo: jax.Array       # [I] first key position any row of the item may see
  key_hi: jax.Array       # [I] last key position any row of the item may see (< key_lo: none)
  split_first: jax.Array  # [I, S] first logical page (column of page_table) of the split
  split_pages: jax.Array  # [I, S] pages in the split (0: nothing to do)
  q_token: jax.Array      # [I, block_q] token row of q feeding the item row (clipped into range)
  tok_item: jax.Array     # [T] item holding the token
  tok_row: jax.Array      # [T] row of that item
  tok_valid: jax.Array    # [T] False for padding tokens


def max_pages_needed(pages_per_seq: int, page_size: int, block_q: int, sliding_window) -> int:
  """Static bound on the logical pages one item needs: all of them, or what a window plus the item's rows
  can span (misaligned by at most one page)."""
  if sliding_window is None:
    return pages_per_seq
  return min(pages_per_seq, C.cdiv(sliding_window + block_q - 1, page_size) + 1)


def _key_range(pos0, rows, kv_len, sliding_window):
  """[lo, hi]: the keys some row of the item may see (hi < lo when none)."""
  hi = jnp.where(rows > 0, jnp.minimum(pos0 + rows - 1, kv_len - 1), -1)
  lo = jnp.zeros_like(pos0) if sliding_window is None else jnp.maximum(pos0 - sliding_window + 1, 0)
  return lo.astype(jnp.int32), hi.astype(jnp.int32)


def _split_ranges(lo, last, *, page_size, num_splits):
  has = (last >= lo) & (last >= 0)
  first_page = lo // page_size
  n = jnp.where(has, last // page_size - first_page + 1, 0)
  per = (n + num_splits - 1) // num_splits
  sp = jnp.arange(num_splits, dtype=jnp.int32)[None, :]
  split_first = first_page[:, None] + sp * per[:, None]
  split_pages = jnp.clip(n[:, None] - sp * per[:, None], 0, per[:, None])
  return split_first.astype(jnp.int32), split_pages.astype(jnp.int32)


def decode_plan(kv_lens, *, capacity: int, page_size: int, pages_per_seq: int, num_splits: int,
                sliding_window) -> Plan:
  """One item of one row per batch entry: the new token at position kv_len - 1."""
  batch = kv_lens.shape[0]
  kv_len = jnp.clip(C.int32(kv_lens), 0, capacity)
  pos0 = kv_len - 1
  rows = jnp.ones((batch,), jnp.int32)
  key_lo, key_hi = _key_range(pos0, rows, kv_len, sliding_window)
  split_first, split_pages = _split_ranges(key_lo, key_hi, page_size=page_size, num_splits=num_splits)
  ar = jnp.arange(batch, dtype=jnp.int32)
  max_pages = max_pages_needed(pages_per_seq, page_size, 1, sliding_window)
  return Plan(block_q=1, num_items=batch, num_splits=num_splits, max_pages_per_split=C.cdiv(max_pages, num_splits),
              seq=ar, pos0=pos0, rows=rows, kv_len=kv_len, key_lo=key_lo, key_hi=key_hi, split_first=split_first,
              split_pages=split_pages,
              q_token=ar[:, None], tok_item=ar, tok_row=jnp.zeros_like(ar), tok_valid=jnp.ones((batch,), bool))


def num_ragged_items(max_tokens: int, max_seqs: int, block_q: int) -> int:
  return min(C.cdiv(max_tokens, block_q) + max_seqs - 1, max_tokens)


def ragged_plan(kv_lens, cu_q_lens, num_seqs, *, max_tokens: int, capacity: int, page_size: int,
                pages_per_seq: int, block_q: int, num_splits: int, sliding_window) -> Plan:
  max_seqs = kv_lens.shape[0]
  num_seqs = jnp.clip(jnp.asarray(num_seqs, jnp.int32).reshape(()), 0, max_seqs)
  cu = jnp.clip(C.int32(cu_q_lens), 0, max_tokens)
  cu = jax.lax.cummax(cu)  # tolerate nothing decreasing
  sidx = jnp.arange(max_seqs, dtype=jnp.int32)
  live = sidx < num_seqs
  q_len = jnp.where(live, cu[1:] - cu[:-1], 0)
  kv_len = jnp.clip(C.int32(kv_lens), 0, capacity)
  chunks = (q_len + block_q - 1) // block_q
  ends = jnp.cumsum(chunks)
  starts = ends - chunks
  total = ends[-1]

  num_items = num_ragged_items(max_tokens, max_seqs, block_q)
  it = jnp.arange(num_items, dtype=jnp.int32)
  seq = jnp.minimum(jnp.sum(ends[None, :] <= it[:, None], axis=1, dtype=jnp.int32), max_seqs - 1)
  valid_item = it < total
  c = it - starts[seq]
  rows = jnp.where(valid_item, jnp.clip(q_len[seq] - c * block_q, 0, block_q), 0)
  first_tok = cu[seq] + c * block_q
  pos0 = kv_len[seq] - q_len[seq] + c * block_q
  item_kv = kv_len[seq]
  key_lo, key_hi = _key_range(pos0, rows, item_kv, sliding_window)
  split_first, split_pages = _split_ranges(key_lo, key_hi, page_size=page_size, num_splits=num_splits)
  q_token = jnp.clip(first_tok[:, None] + jnp.arange(block_q, dtype=jnp.int32)[None, :], 0, max_tokens - 1)

  t = jnp.arange(max_tokens, dtype=jnp.int32)
  seq_ends = jnp.where(live, cu[1:], jnp.iinfo(jnp.int32).max)
  ts = jnp.minimum(jnp.sum(seq_ends[None, :] <= t[:, None], axis=1, dtype=jnp.int32), max_seqs - 1)
  tok_valid = (t >= cu[0]) & (t < cu[num_seqs]) & (num_seqs > 0)
  off = t - cu[ts]
  tok_item = jnp.clip(starts[ts] + off // block_q, 0, num_items - 1)
  tok_row = off % block_q
  max_pages = max_pages_needed(pages_per_seq, page_size, block_q, sliding_window)
  return Plan(block_q=block_q, num_items=num_items, num_splits=num_splits,
              max_pages_per_split=C.cdiv(max_pages, num_splits), seq=seq, pos0=pos0, rows=rows,
              kv_len=item_kv, key_lo=key_lo, key_hi=key_hi, split_first=split_first, split_pages=split_pages,
              q_token=q_token,
              tok_item=tok_item, tok_row=tok_row, tok_valid=tok_valid)


def gather_tokens(o_items, lse_items, plan: Plan):
  """o_items [I, block_q, hq, d], lse_items [I, block_q, hq] -> token order [T, hq, d], [T, hq]; padding
  tokens get zeros and lse -inf."""
  o = o_items[plan.tok_item, plan.tok_row]
  lse = lse_items[plan.tok_item, plan.tok_row]
  valid = plan.tok_valid
  o = jnp.where(valid[:, None, None], o, 0.0)
  lse = jnp.where(valid[:, None], lse, -jnp.inf)
  return o, lse


# ------------------------------------------------------------------------------------ the two entry shapes


def run_decode(attend, q, k_pages, page_table, kv_lens, params: C.ScoreParams, *, splits, return_lse: bool):
  """paged_attention around one implementation's `attend(q_items, plan) -> (o, lse)` per item: the decode plan
  (one item of one row per sequence) with `splits(max_pages)` split-K ranges (capped at max_pages)."""
  ps, pps = k_pages.shape[1], page_table.shape[1]
  max_pages = max_pages_needed(pps, ps, 1, params.sliding_window)
  plan = decode_plan(kv_lens, capacity=pps * ps, page_size=ps, pages_per_seq=pps,
                     num_splits=min(splits(max_pages), max_pages), sliding_window=params.sliding_window)
  o, lse = attend(q[:, None], plan)
  o = o[:, 0].astype(q.dtype)
  return (o, lse[:, 0]) if return_lse else o


def run_ragged(attend, q, k_pages, page_table, kv_lens, cu_q_lens, num_seqs, params: C.ScoreParams, *,
               block_q: int, num_splits, return_lse: bool):
  """ragged_paged_attention around one implementation's `attend(q_items, plan)`: the ragged plan (items of up
  to block_q rows, num_splits split-K ranges, None: 1), then the item rows back in token order."""
  T = q.shape[0]
  ps, pps = k_pages.shape[1], page_table.shape[1]
  bq = min(block_q, T)
  max_pages = max_pages_needed(pps, ps, bq, params.sliding_window)
  plan = ragged_plan(kv_lens, cu_q_lens, num_seqs, max_tokens=T, capacity=pps * ps, page_size=ps,
                     pages_per_seq=pps, block_q=bq, num_splits=min(num_splits or 1, max_pages),
                     sliding_window=params.sliding_window)
  o, lse = gather_tokens(*attend(q[plan.q_token], plan), plan)
  o = o.astype(q.dtype)
  return (o, lse) if return_lse else o
