"""A contiguous per-sequence KV cache: what jaxinfer.generate decodes with (the engine has its paged one).

The model talks to any cache through three calls (the protocol the engine's paged cache implements too):
  cache = cache.begin(positions, segment_ids)          # before the layers: record the new tokens
  out, layer_kv = cache.attend(layer, q, k, v, ...)    # per layer: store k/v, attend over everything held
  cache = cache.finish(layer_kvs, num_tokens)          # after the layers: the updated cache

Slots carry the position and segment id of the token stored there, so the attention mask follows the
tokens: empty slots have segment id EMPTY_SEGMENT, which no query token has.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct

from jaxinfer.models.attention import attention

EMPTY_SEGMENT = -1


@struct.dataclass
class KVCache:
  k: tuple  # per layer [batch, max_len, kv_heads, head_dim]
  v: tuple
  positions: jax.Array  # [batch, max_len] int32
  segment_ids: jax.Array  # [batch, max_len] int32, EMPTY_SEGMENT where nothing was written
  index: jax.Array  # scalar int32: the next slot to write

  @classmethod
  def create(cls, cfg, batch: int, max_len: int, dtype=None) -> "KVCache":
    dtype = jnp.dtype(dtype or cfg.dtype)
    shape = (batch, max_len, cfg.num_kv_heads, cfg.resolved_head_dim)
    zeros = tuple(jnp.zeros(shape, dtype) for _ in range(cfg.num_layers))
    return cls(k=zeros, v=tuple(jnp.zeros(shape, dtype) for _ in range(cfg.num_layers)),
               positions=jnp.zeros((batch, max_len), jnp.int32),
               segment_ids=jnp.full((batch, max_len), EMPTY_SEGMENT, jnp.int32),
               index=jnp.zeros((), jnp.int32))

  @property
  def max_len(self) -> int:
    return self.positions.shape[1]

  def begin(self, positions, segment_ids) -> "KVCache":
    """Record positions/segments of the tokens about to be written at `index` (before the layers run)."""
    start = (0, self.index)
    return self.replace(positions=jax.lax.dynamic_update_slice(self.positions, positions.astype(jnp.int32), start),
                        segment_ids=jax.lax.dynamic_update_slice(self.segment_ids, segment_ids.astype(jnp.int32),
                                                                 start))

  def attend(self, layer: int, q, k, v, *, positions, segment_ids, sliding_window, implementation):
    """Writes this layer's new k/v at `index` and attends q over the whole cache. Returns (out, (k_all, v_all))."""
    start = (0, self.index, 0, 0)
    k_all = jax.lax.dynamic_update_slice(self.k[layer], k.astype(self.k[layer].dtype), start)
    v_all = jax.lax.dynamic_update_slice(self.v[layer], v.astype(self.v[layer].dtype), start)
    out = attention(q, k_all.astype(q.dtype), v_all.astype(q.dtype), q_positions=positions,
                    kv_positions=self.positions, q_segment_ids=segment_ids, kv_segment_ids=self.segment_ids,
                    sliding_window=sliding_window, implementation=implementation)
    return out, (k_all, v_all)

  def finish(self, layer_kvs, num_tokens: int) -> "KVCache":
    return self.replace(k=tuple(kv[0] for kv in layer_kvs), v=tuple(kv[1] for kv in layer_kvs),
                        index=self.index + num_tokens)
