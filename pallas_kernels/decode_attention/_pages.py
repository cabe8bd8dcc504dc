"""A contiguous cache [batch, max_kv_len, kv_heads, head_dim] viewed as a page pool (a free reshape) with an
identity page table, so the paged kernels serve decode_attention too."""

from __future__ import annotations

import math

import jax.numpy as jnp


def as_pages(k, v, page_size_hint: int):
  """-> (k_pages, v_pages, page_table). The page size is gcd(max_kv_len, hint), so it always divides the
  length (no padding copy); it is the granularity of the split-K ranges."""
  b, L, hkv, d = k.shape
  ps = math.gcd(L, page_size_hint)
  n = L // ps
  table = jnp.arange(b * n, dtype=jnp.int32).reshape(b, n)
  return k.reshape(b * n, ps, hkv, d), v.reshape(b * n, ps, hkv, d), table
