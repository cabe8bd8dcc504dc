"""KVPool: the engine's KV storage, a pytree of per-layer page arrays (plus optional scales and positions).

Storage only: where a step reads and writes is the step's AttentionMetadata (jaxinfer/engine/batch.py), not
the pool's business. Per layer the pool holds k and v pages [num_pages, page_size, kv_heads, head_dim] in
`dtype` (EngineConfig.kv_dtype, default the model's dtype), and optionally
  - k_scales / v_scales: per-layer scale arrays for a quantized pool (None for this full-precision pool; a
    quantized pool fills them and replaces the one write, `store` below, and the one read, in
    PagedKVCache.attend; nothing else changes), and
  - positions [num_pages * page_size] int32: the token position each slot holds (-1: never written), kept
    only when a KV policy needs it (EngineConfig.track_slot_positions): a policy that compacts or drops slots
    reads it instead of assuming slot = page_table[pos // page_size] * page_size + pos % page_size.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct


@struct.dataclass
class KVPool:
  k: tuple  # per layer [num_pages, page_size, kv_heads, head_dim]
  v: tuple
  k_scales: tuple | None = None  # per layer, for quantized pools (None: full precision)
  v_scales: tuple | None = None
  positions: jax.Array | None = None  # [num_pages * page_size] int32, when tracked
  policy: object = None  # a KV policy's device state (jaxinfer/engine/kv_policies/attention.py PolicyState)

  @classmethod
  def create(cls, model_config, num_pages: int, page_size: int, dtype=None, track_positions: bool = False):
    dtype = jnp.dtype(dtype or model_config.dtype)
    shape = (num_pages, page_size, model_config.num_kv_heads, model_config.resolved_head_dim)
    zeros = lambda: tuple(jnp.zeros(shape, dtype) for _ in range(model_config.num_layers))  # noqa: E731
    positions = jnp.full((num_pages * page_size,), -1, jnp.int32) if track_positions else None
    return cls(k=zeros(), v=zeros(), positions=positions)

  @property
  def num_pages(self) -> int:
    return self.k[0].shape[0]

  @property
  def page_size(self) -> int:
    return self.k[0].shape[1]

  @property
  def num_slots(self) -> int:
    return self.num_pages * self.page_size

  @property
  def dtype(self):
    return self.k[0].dtype

  def record_positions(self, slots, positions) -> "KVPool":
    """Slot -> position for the new tokens (padding slots are out of the pool and dropped)."""
    if self.positions is None:
      return self
    return self.replace(positions=self.positions.at[slots].set(positions.astype(jnp.int32), mode="drop"))

  def copy_pages(self, src, dst) -> "KVPool":
    """Page dst[i] of every layer becomes a copy of page src[i] (out-of-pool dst entries are dropped)."""
    cp = lambda pages: tuple(p.at[dst].set(p[src], mode="drop") for p in pages)  # noqa: E731
    ps = self.page_size
    positions = self.positions
    if positions is not None:
      offs = jnp.arange(ps, dtype=jnp.int32)
      positions = positions.at[(dst[:, None] * ps + offs).reshape(-1)].set(
          positions[(src[:, None] * ps + offs).reshape(-1)], mode="drop")
    return self.replace(k=cp(self.k), v=cp(self.v), positions=positions)


def store(k_pages, v_pages, slots, k, v):
  """Writes new k/v [T, kv_heads, d] at flat slots [T] (out-of-pool slots dropped) of one layer's pages."""
  flat = (k_pages.shape[0] * k_pages.shape[1],) + k_pages.shape[2:]
  kp = k_pages.reshape(flat).at[slots].set(k.astype(k_pages.dtype), mode="drop").reshape(k_pages.shape)
  vp = v_pages.reshape(flat).at[slots].set(v.astype(v_pages.dtype), mode="drop").reshape(v_pages.shape)
  return kp, vp
