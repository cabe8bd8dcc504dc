"""decode_attention for NVIDIA GPUs ("pallas_gpu"): the paged kernel of pallas_kernels/paged_attention/gpu.py
on the contiguous cache viewed as pages (no copy). Grid (batch, kv_head, split); each program streams its
split's keys block_k at a time with masked loads, so keys past kv_len or outside the window are not read;
partials are merged by log-sum-exp (FlashDecoding)."""

from __future__ import annotations

from pallas_kernels import decode_common as C
from pallas_kernels.pages import as_pages
from pallas_kernels.paged_attention import gpu as _paged
from pallas_kernels.paged_attention._quant import contiguous_scales

NAME = _paged.NAME
DEFAULT_BLOCK_K = 64
DEFAULT_SPLIT_GRANULE = 256  # keys per page of the view: the unit split ranges are made of


def unavailable_reason(interpret) -> str | None:
  return _paged.unavailable_reason(interpret)


def decode_attention(q, k, v, kv_lens, *, sm_scale=None, sliding_window=None, logits_soft_cap=None,
                     num_splits=None, return_lse=False, interpret=False, block_k: int = DEFAULT_BLOCK_K,
                     split_granule: int = DEFAULT_SPLIT_GRANULE, num_warps: int | None = None,
                     num_stages: int = 2, k_scales=None, v_scales=None):
  """Same contract as `pallas_kernels.decode_attention`; block_k: keys per iteration (power of two >= 16),
  split_granule: split ranges are multiples of gcd(max_kv_len, split_granule) keys."""
  C.check_block("split_granule", split_granule, implementation=NAME)
  k_pages, v_pages, table = as_pages(k, v, split_granule)
  quant = {} if k_scales is None else dict(k_scales=contiguous_scales(k_scales, k_pages),
                                           v_scales=contiguous_scales(v_scales, v_pages))
  return _paged.paged_attention(q, k_pages, v_pages, table, kv_lens, sm_scale=sm_scale, **quant,
                                sliding_window=sliding_window, logits_soft_cap=logits_soft_cap,
                                num_splits=num_splits, return_lse=return_lse, interpret=interpret, block_k=block_k,
                                num_warps=num_warps, num_stages=num_stages)
