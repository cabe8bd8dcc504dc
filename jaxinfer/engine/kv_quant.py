"""Quantized KV pools (engine.kv_cache_dtype "int8" / "float8_e4m3fn"): the scale layouts and quantize-on-write.

Real value = float32(code) * scale, symmetric (absmax) scales in float32 (layouts in
pallas_kernels/paged_attention/_quant.py; the attention kernels dequantize the tiles they load, never the pool):
  - values: per token, one scale per (slot, kv head) over head_dim, as in KIVI / KVQuant;
  - keys, kv_quant_key_granularity="per_channel" (the default, as in KIVI / KVQuant): one scale per (page, kv
    head, channel). KIVI groups keys per channel within a group of tokens; our group is the page. Pages are
    written a few tokens at a time (a prefill chunk, then one decode token per step), so the page's scale is
    the running absmax of the keys written to it since its slot 0 was last written (writing slot 0 means the
    page starts a new run of tokens: a fresh or reused page, a recomputed prefix). When a write raises a
    channel's scale, the codes already in that page are requantized to the new scale (dequantize with the old
    scale, quantize with the new one: one extra rounding, at most half a step of the new scale); when it does
    not, they are left as they are. The rule is exact and deterministic given the order of writes, and
    tests/engine/test_kv_quantization.py replays it in numpy;
  - keys, "per_token": like values (one scale per slot and kv head).
"""

from __future__ import annotations

import jax.numpy as jnp

QMAX = {"int8": 127.0, "float8_e4m3fn": 448.0}
KEY_GRANULARITIES = ("per_channel", "per_token")


def qmax(dtype) -> float:
  return QMAX[jnp.dtype(dtype).name]


def quantize(x, scale, dtype):
  """Codes of x (float) for scale (broadcast); scale 0 (an all-zero group) gives code 0."""
  dtype = jnp.dtype(dtype)
  m = qmax(dtype)
  y = jnp.where(scale > 0, x.astype(jnp.float32) / jnp.where(scale > 0, scale, 1.0), 0.0)
  y = jnp.clip(y, -m, m)
  if dtype == jnp.int8:
    y = jnp.round(y)
  return y.astype(dtype)


def dequantize(codes, scale):
  return codes.astype(jnp.float32) * scale


def roundtrip(x, dtype):
  """x [..., kv_heads, d] as a KV pool of dtype gives it back (float32): a quantized dtype per token
  (dequantize(quantize(x)), the per-token layout), a float dtype by casting (the dense references' KV dtypes)."""
  x = x.astype(jnp.float32)
  if jnp.dtype(dtype).name in QMAX:
    s = token_scales(x, dtype)
    return dequantize(quantize(x, s, dtype), s)
  return x.astype(dtype).astype(jnp.float32)


def token_scales(x, dtype):
  """Per-token absmax scales of x [T, kv_heads, d] -> [T, kv_heads, 1]."""
  return jnp.max(jnp.abs(x.astype(jnp.float32)), axis=-1, keepdims=True) / qmax(dtype)


def store_per_token(pages, scales, slots, x):
  """Writes x [T, kv_heads, d] at flat slots (out-of-pool dropped) of pages [P, ps, hkv, d] with per-token
  scales [P, ps, hkv, 1]."""
  P, ps, hkv, d = pages.shape
  s = token_scales(x, pages.dtype)
  codes = quantize(x, s, pages.dtype)
  new_pages = pages.reshape(P * ps, hkv, d).at[slots].set(codes, mode="drop").reshape(pages.shape)
  new_scales = scales.reshape(P * ps, hkv, 1).at[slots].set(s, mode="drop").reshape(scales.shape)
  return new_pages, new_scales


def store_per_channel(pages, scales, slots, x):
  """Writes x [T, kv_heads, d] at flat slots of pages [P, ps, hkv, d] with per-page per-channel scales
  [P, 1, hkv, d] (the running-absmax rule of the module docstring)."""
  P, ps, hkv, d = pages.shape
  page = slots // ps  # >= P for padding rows: dropped by every scatter below
  pg = jnp.clip(page, 0, P - 1)
  restart = jnp.zeros((P,), bool).at[page].max(slots % ps == 0, mode="drop")
  base = jnp.where(restart[:, None, None, None], 0.0, scales)
  cand = (jnp.abs(x.astype(jnp.float32)) / qmax(pages.dtype))[:, None]  # [T, 1, hkv, d]
  new_scales = base.at[page].max(cand, mode="drop")
  # requantize the old codes of every page written to (each of its rows computes the same page)
  old_s, new_s = scales[pg], new_scales[pg]  # [T, 1, hkv, d]
  old = pages[pg]  # [T, ps, hkv, d]
  requant = jnp.where(old_s == new_s, old, quantize(dequantize(old, old_s), new_s, pages.dtype))
  pages = pages.at[page].set(requant, mode="drop")
  codes = quantize(x, new_s[:, 0], pages.dtype)
  pages = pages.reshape(P * ps, hkv, d).at[slots].set(codes, mode="drop").reshape(pages.shape)
  return pages, new_scales


def store(k_pages, v_pages, k_scales, v_scales, slots, k, v):
  """Quantize-on-write of one layer: new k/v [T, kv_heads, d] -> (k_pages, v_pages, k_scales, v_scales).
  The key granularity follows the shape of k_scales (per token: [P, ps, hkv, 1]; per channel: [P, 1, hkv, d])."""
  per_token_keys = k_scales.shape[1] == k_pages.shape[1] and k_scales.shape[-1] == 1
  kp, ks = (store_per_token if per_token_keys else store_per_channel)(k_pages, k_scales, slots, k)
  vp, vs = store_per_token(v_pages, v_scales, slots, v)
  return kp, vp, ks, vs


def move_slots(pages, scales, src, new_slots):
  """Compaction of a quantized layer (kv_policies/device.py): slot new_slots[i] head h becomes a copy of slot
  src[i, h] head h (flat slot indices; pages [P, ps, hkv, d], scales of either layout). Per-token scales
  move with their codes (exact). Per-channel key scales belong to a page, and a kept slot lands in another
  page beside slots from other pages: its key is dequantized with its source page's scale and requantized
  with the destination page's new scale, the absmax of the keys that land there (the destination pages are
  fresh: a new run of the running-absmax rule). One extra rounding, at most half a step of the new scale;
  the new scale is at most the largest source scale, so the step never grows."""
  P, ps, hkv, d = pages.shape
  flat = pages.reshape(P * ps, hkv, d)
  heads = jnp.arange(hkv)[None, :]
  if scales.shape[1] == ps:  # per token
    sf = scales.reshape(P * ps, hkv, 1)
    return (flat.at[new_slots].set(flat[src, heads]).reshape(pages.shape),
            sf.at[new_slots].set(sf[src, heads]).reshape(scales.shape))
  x = dequantize(flat[src, heads], scales[src // ps, 0, heads])  # [keep, hkv, d]
  dst = new_slots // ps
  new_scales = scales.at[dst].set(0.0).at[dst, 0].max(jnp.abs(x) / qmax(pages.dtype))
  codes = quantize(x, new_scales[dst, 0], pages.dtype)
  return flat.at[new_slots].set(codes).reshape(pages.shape), new_scales


def scale_shapes(num_pages: int, page_size: int, kv_heads: int, head_dim: int, key_granularity: str):
  """(k_scales shape, v_scales shape) of one layer."""
  if key_granularity not in KEY_GRANULARITIES:
    raise ValueError(f"key_granularity must be one of {KEY_GRANULARITIES}, got {key_granularity!r}")
  v = (num_pages, page_size, kv_heads, 1)
  k = v if key_granularity == "per_token" else (num_pages, 1, kv_heads, head_dim)
  return k, v


def page_bytes(model_config, page_size: int, dtype, key_granularity: str = "per_channel") -> int:
  """Device bytes of one page over all layers (k and v, scales included): what KVPool.nbytes / num_pages is."""
  hkv, d, layers = model_config.num_kv_heads, model_config.resolved_head_dim, model_config.num_layers
  dtype = jnp.dtype(dtype)
  pages = 2 * page_size * hkv * d * dtype.itemsize
  if dtype.name not in QMAX:
    return layers * pages
  ks, vs = scale_shapes(1, page_size, hkv, d, key_granularity)
  count = lambda shape: int(jnp.prod(jnp.asarray(shape)))  # noqa: E731
  return layers * (pages + 4 * (count(ks) + count(vs)))
