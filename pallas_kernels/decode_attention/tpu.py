"""decode_attention for TPUs ("pallas_tpu"): the paged kernel of pallas_kernels/paged_attention/tpu.py on the
contiguous cache viewed as pages of gcd(max_kv_len, block_k) keys (a free reshape, identity page table).
Grid (batch, split, block); blocks past kv_len or outside the window repeat the previous block index (no
DMA) and skip their compute; partials are merged by log-sum-exp (FlashDecoding)."""

from __future__ import annotations

from pallas_kernels import decode_common as C
from pallas_kernels.pages import as_pages
from pallas_kernels.paged_attention import tpu as _paged
from pallas_kernels.paged_attention._quant import contiguous_scales

NAME = _paged.NAME
DEFAULT_BLOCK_K = 256


def unavailable_reason(interpret) -> str | None:
  return _paged.unavailable_reason(interpret)


def decode_attention(q, k, v, kv_lens, *, sm_scale=None, sliding_window=None, logits_soft_cap=None,
                     num_splits=None, return_lse=False, interpret=False, block_k: int = DEFAULT_BLOCK_K,
                     k_scales=None, v_scales=None):
  """Same contract as `pallas_kernels.decode_attention`; block_k: keys per grid step (the page size of the
  view is gcd(max_kv_len, block_k))."""
  C.check_block("block_k", block_k, implementation=NAME)
  k_pages, v_pages, table = as_pages(k, v, block_k)
  quant = {} if k_scales is None else dict(k_scales=contiguous_scales(k_scales, k_pages),
                                           v_scales=contiguous_scales(v_scales, v_pages))
  return _paged.paged_attention(q, k_pages, v_pages, table, kv_lens, sm_scale=sm_scale, **quant,
                                sliding_window=sliding_window, logits_soft_cap=logits_soft_cap,
                                num_splits=num_splits, return_lse=return_lse, interpret=interpret,
                                pages_per_block=1)
