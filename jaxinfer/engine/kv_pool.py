"""KVPool: the engine's KV storage, a pytree of per-layer page arrays (plus optional scales and positions).

Storage only: where a step reads and writes is the step's AttentionMetadata (jaxinfer/engine/batch.py), not
the pool's business. Per layer the pool holds k and v pages [num_pages, page_size, kv_heads, head_dim] in
`dtype` (EngineConfig.kv_dtype, default the model's dtype), and optionally
  - k_scales / v_scales: per-layer float32 scale arrays of a quantized pool (dtype int8 or float8_e4m3fn,
    EngineConfig.kv_cache_dtype; layouts and the quantize-on-write rule in jaxinfer/engine/kv_quant.py; None
    for a full-precision pool). The write is kv_quant.store instead of `store` below, and the attention
    kernels take the scales and dequantize the tiles they load (PagedKVCache.attend), and
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
  def create(cls, model_config, num_pages: int, page_size: int, dtype=None, track_positions: bool = False,
             kv_repeat: int = 1, key_granularity: str = "per_channel", layer_kv_heads: tuple | None = None):
    """Zeroed pools; dtype int8 / float8_e4m3fn makes a quantized pool (scales per key_granularity).
    kv_repeat > 1: each KV head stored that many times (a pool sharded over more devices than KV heads).
    layer_kv_heads: kv heads held per layer, when a KV policy keeps only some in the pages (duo; may be 0)."""
    from jaxinfer.engine import kv_quant

    dtype = jnp.dtype(dtype or model_config.dtype)
    heads = (model_config.num_kv_heads,) * model_config.num_layers if layer_kv_heads is None else layer_kv_heads
    shapes = [(num_pages, page_size, h * kv_repeat, model_config.resolved_head_dim) for h in heads]
    zeros = lambda shapes, dt: tuple(jnp.zeros(s, dt) for s in shapes)  # noqa: E731
    positions = jnp.full((num_pages * page_size,), -1, jnp.int32) if track_positions else None
    k_scales = v_scales = None
    if dtype.name in kv_quant.QMAX:
      sc = [kv_quant.scale_shapes(*s, key_granularity) for s in shapes]
      k_scales, v_scales = zeros([k for k, _ in sc], jnp.float32), zeros([v for _, v in sc], jnp.float32)
    return cls(k=zeros(shapes, dtype), v=zeros(shapes, dtype), k_scales=k_scales, v_scales=v_scales,
               positions=positions)

  @property
  def quantized(self) -> bool:
    return self.k_scales is not None

  @property
  def nbytes(self) -> int:
    """Device bytes of the KV storage (pages and scales; positions not included)."""
    arrays = list(self.k) + list(self.v) + list(self.k_scales or ()) + list(self.v_scales or ())
    return int(sum(a.nbytes for a in arrays))

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
    offs = jnp.arange(self.page_size, dtype=jnp.int32)
    src_slots = (src[:, None] * self.page_size + offs).reshape(-1)
    dst_slots = (dst[:, None] * self.page_size + offs).reshape(-1)
    positions = self.positions
    if positions is not None:
      positions = positions.at[dst_slots].set(positions[src_slots], mode="drop")
    scales = {} if self.k_scales is None else dict(k_scales=cp(self.k_scales), v_scales=cp(self.v_scales))
    policy = self.policy
    if policy is not None:  # a KV policy's per-slot state travels with the slots (copy-on-write of a page)
      policy = policy.copy_slots(src_slots, dst_slots)
    return self.replace(k=cp(self.k), v=cp(self.v), positions=positions, policy=policy, **scales)

  def move_slots(self, src, dst) -> "KVPool":
    """Slot dst[i] of every layer takes slot src[i]'s k/v (gathered first, so moves may overlap; out-of-pool dst
    entries are dropped). Full-precision pools only: a quantized pool's per-channel key scales belong to a page."""
    if self.k_scales is not None:
      raise NotImplementedError("moving slots of a quantized KV pool")

    def mv(pages):
      flat = pages.reshape((pages.shape[0] * pages.shape[1],) + pages.shape[2:])
      return flat.at[dst].set(flat[jnp.clip(src, 0, flat.shape[0] - 1)], mode="drop").reshape(pages.shape)

    positions = self.positions
    if positions is not None:
      positions = positions.at[dst].set(positions[jnp.clip(src, 0, positions.shape[0] - 1)], mode="drop")
    return self.replace(k=tuple(mv(p) for p in self.k), v=tuple(mv(p) for p in self.v), positions=positions)


def store(k_pages, v_pages, slots, k, v):
  """Writes new k/v [T, kv_heads, d] at flat slots [T] (out-of-pool slots dropped) of one layer's pages."""
  flat = (k_pages.shape[0] * k_pages.shape[1],) + k_pages.shape[2:]
  kp = k_pages.reshape(flat).at[slots].set(k.astype(k_pages.dtype), mode="drop").reshape(k_pages.shape)
  vp = v_pages.reshape(flat).at[slots].set(v.astype(v_pages.dtype), mode="drop").reshape(v_pages.shape)
  return kp, vp
