"""Page-pool helpers shared by the paged ops and their users (a neutral module: no op folder imports another
through it): a contiguous cache viewed as pages, and pages gathered back into a contiguous cache."""

from __future__ import annotations

import math

import jax.numpy as jnp


def as_pages(k, v, page_size_hint: int):
  """A contiguous cache [batch, max_kv_len, kv_heads, head_dim] as a page pool (a free reshape) with an
  identity page table -> (k_pages, v_pages, page_table). The page size is gcd(max_kv_len, hint), so it always
  divides the length (no padding copy); it is the granularity of the split-K ranges."""
  b, L, hkv, d = k.shape
  ps = math.gcd(L, page_size_hint)
  n = L // ps
  table = jnp.arange(b * n, dtype=jnp.int32).reshape(b, n)
  return k.reshape(b * n, ps, hkv, d), v.reshape(b * n, ps, hkv, d), table


def gather_pages(pages, page_table):
  """pages [P, page_size, kv_heads, d], page_table [n, pages_per_seq] -> contiguous [n, pages_per_seq *
  page_size, kv_heads, d] (out-of-range page ids are clamped; they only ever feed masked slots)."""
  num_pages, page_size, hkv, d = pages.shape
  n, pps = page_table.shape
  idx = jnp.clip(jnp.asarray(page_table, jnp.int32), 0, num_pages - 1)
  return pages[idx].reshape(n, pps * page_size, hkv, d)
