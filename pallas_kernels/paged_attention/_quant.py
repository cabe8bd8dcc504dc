"""Quantized page pools for the paged kernels: the scale layouts and the per-tile dequantization.

A quantized pool stores k/v pages [num_pages, page_size, kv_heads, head_dim] in int8 or float8_e4m3fn with a
float32 scale array per pool, in one of two layouts (both broadcast against a page):
  - per token:   [num_pages, page_size, kv_heads, 1]: one scale per (slot, kv head), over head_dim
                 (values as in KIVI/KVQuant; keys with kv_quant_key_granularity="per_token");
  - per channel: [num_scale_pages, 1, kv_heads, head_dim]: one scale per (group of pages, kv head, channel),
                 shared by the page_size * pages_per_scale tokens of the group, where pages_per_scale =
                 num_pages // num_scale_pages (1 for the engine's pools: a scale per page; a contiguous cache
                 viewed as pages has one group per sequence). Keys as in KIVI/KVQuant.
The real value of element x is float32(x) * scale. Every kernel multiplies the tile it has just loaded (never
the pool) by the matching tile of scales, so a quantized pool costs one extra small load per tile.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp

QUANTIZED_DTYPES = ("int8", "float8_e4m3fn")


@dataclasses.dataclass(frozen=True)
class ScaleLayout:
  """Static description of one pool's scales: 'token' or 'channel', and pages per scale row (channel)."""
  kind: str
  pages_per_scale: int = 1


def layout(pages, scales, name: str) -> ScaleLayout | None:
  """The layout of `scales` for `pages` (None: a float pool); ValueError naming the argument otherwise."""
  if scales is None:
    return None
  if not (hasattr(scales, "shape") and hasattr(scales, "dtype")):
    raise ValueError(f"{name} must be a float32 array, got {type(scales).__name__}")
  if scales.dtype != jnp.float32:
    raise ValueError(f"{name} must be float32, got dtype {scales.dtype}")
  n, ps, hkv, d = pages.shape
  shape = tuple(scales.shape)
  if shape == (n, ps, hkv, 1):
    return ScaleLayout("token")
  if len(shape) == 4 and shape[1:] == (1, hkv, d) and shape[0] >= 1 and n % shape[0] == 0:
    return ScaleLayout("channel", n // shape[0])
  raise ValueError(f"{name} must have shape {(n, ps, hkv, 1)} (per token) or (num_pages / k, 1, {hkv}, {d}) "
                   f"(per channel, k pages per scale row) for pages of shape {tuple(pages.shape)}, got {shape}")


def scale_rows(lay: ScaleLayout, phys):
  """Row of the scale array for physical page ids `phys` (any shape)."""
  return phys if lay.kind == "token" or lay.pages_per_scale == 1 else phys // lay.pages_per_scale


def dequant_pages(pages, scales, lay: ScaleLayout | None, phys, dtype):
  """pages[phys] (shape phys.shape + [page_size, kv_heads, head_dim]) as real values in `dtype`; float pools
  are gathered as they are."""
  tile = pages[phys]
  if lay is None:
    return tile
  return (tile.astype(jnp.float32) * scales[scale_rows(lay, phys)]).astype(dtype)


def contiguous_scales(scales, pages):
  """A contiguous cache's scales [batch, max_kv_len, kv_heads, 1] (per token) or [batch, 1, kv_heads, d] (per
  channel of each sequence) in the layout above for `pages` (pallas_kernels.pages.as_pages of that cache):
  per token a free reshape to [num_pages, page_size, kv_heads, 1]; per channel unchanged (one scale row per
  sequence, num_pages / batch pages per row)."""
  if scales.shape[-1] == 1 and scales.shape[0] * scales.shape[1] == pages.shape[0] * pages.shape[1]:
    return scales.reshape(pages.shape[:3] + (1,))
  return scales
