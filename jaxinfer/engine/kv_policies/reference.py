"""Dense references for the KV policies: the model over a whole sequence at once (teacher forcing) with an
explicit visibility mask per (layer, query, kv head, key), written without the paged layout.

  logits = masked_logits(model, tokens, vis)          # vis [layers, N, kv_heads, N] bool (query, key)
  vis = streaming_visibility(N, layers, kv_heads, sinks, window)
  probs = attention_probs(model, tokens)              # [layers, heads, N, N] causal probabilities

positions="cache" (StreamingLLM's within-cache positions) is reproduced here by rotating the sink KEYS
forward to where the paper's cache puts them, query by query (the engine rotates the query back instead).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from jaxinfer.engine import kv_quant
from jaxinfer.models.rope import apply_rope, rope_cos_sin


@struct.dataclass
class MaskedDenseCache:
  vis: jax.Array  # [layers, N, kv_heads, N] bool
  sink_shift: jax.Array | None = None  # [N] int32: how far sink keys move forward for each query (cache pos.)
  sinks: int = struct.field(pytree_node=False, default=0)
  model_config: object = struct.field(pytree_node=False, default=None)
  probs: tuple = ()
  quant_dtype: str | None = struct.field(pytree_node=False, default=None)  # k/v through kv_quant.roundtrip


  def begin(self, positions, segment_ids):
    del positions, segment_ids
    return self

  def attend(self, layer, q, k, v, *, positions, segment_ids, sliding_window, implementation):
    del segment_ids, sliding_window, implementation
    _, n, heads, d = q.shape
    hkv = k.shape[2]
    g = heads // hkv
    qf = q[0].astype(jnp.float32).reshape(n, hkv, g, d)
    kf, vf = k[0].astype(jnp.float32), v[0].astype(jnp.float32)
    if self.quant_dtype is not None:  # what a pool of that dtype gives back (quantized: per token)
      kf, vf = kv_quant.roundtrip(kf, self.quant_dtype), kv_quant.roundtrip(vf, self.quant_dtype)
    s = jnp.einsum("qhgd,khd->qhgk", qf, kf)
    if self.sink_shift is not None:
      # key j < sinks, seen from query i, sits at position j + shift[i]: rotate it there (k is at j already)
      cos, sin = rope_cos_sin(self.sink_shift[:, None], self.model_config)  # [N, 1, d]
      sink_k = kf[None, :self.sinks]  # [1, sinks, hkv, d]
      rot = apply_rope(jnp.broadcast_to(sink_k, (n,) + sink_k.shape[1:]), cos, sin)  # [N, sinks, hkv, d]
      s_sink = jnp.einsum("qhgd,qkhd->qhgk", qf, rot)
      s = s.at[..., :self.sinks].set(s_sink)
    s = s / np.sqrt(d)
    vis = self.vis[layer].transpose(0, 1, 2)[:, :, None, :]  # [N, hkv, 1, N]
    s = jnp.where(vis, s, -jnp.inf)
    p = jax.nn.softmax(s, axis=-1)
    out = jnp.einsum("qhgk,khd->qhgd", p, vf).reshape(1, n, heads, d).astype(q.dtype)
    return out, p.reshape(n, heads, n)

  def finish(self, layer_kvs, num_tokens):
    del num_tokens
    return self.replace(probs=tuple(layer_kvs))


def _forward(model, tokens, cache):
  tokens = jnp.asarray(tokens, jnp.int32)[None]
  positions = jnp.arange(tokens.shape[1], dtype=jnp.int32)[None]
  return model(tokens, positions, jnp.zeros_like(tokens), cache)


_JIT: dict = {}


def masked_logits(model, tokens, vis, *, sinks: int = 0, sink_shift=None,
                  quant_dtype: str | None = None) -> np.ndarray:
  """[N, vocab] float32 logits of every position, query i seeing key j in (layer, kv head h) iff vis[l, i, h, j].
  quant_dtype ("int8" / "float8_e4m3fn" / a float dtype): keys and values as a pool of that dtype returns
  them (quantized: the per-token layout, kv_quant.roundtrip)."""
  from flax import nnx

  graphdef, state = nnx.split(model)
  key = (graphdef, sinks, sink_shift is None, quant_dtype)
  if key not in _JIT:  # one compile per model and length: experiments call it many times
    def run(state, tokens, vis, shift):
      cache = MaskedDenseCache(vis=vis, sink_shift=shift, sinks=sinks, model_config=model.config,
                               quant_dtype=quant_dtype)
      return _forward(nnx.merge(graphdef, state), tokens, cache)[0][0]
    _JIT[key] = jax.jit(run)
  shift = None if sink_shift is None else jnp.asarray(sink_shift)
  return np.asarray(_JIT[key](state, jnp.asarray(tokens, jnp.int32), jnp.asarray(vis), shift), np.float32)


def attention_probs(model, tokens, quant_dtype: str | None = None) -> np.ndarray:
  """[layers, heads, N, N] causal attention probabilities of a dense forward over tokens (quant_dtype: as in
  masked_logits)."""
  from flax import nnx

  cfg = model.config
  graphdef, state = nnx.split(model)
  key = ("probs", graphdef, quant_dtype)
  if key not in _JIT:
    def run(state, tokens):
      n = tokens.shape[0]
      vis = jnp.broadcast_to(jnp.tril(jnp.ones((n, n), bool))[:, None, :], (cfg.num_layers, n, cfg.num_kv_heads, n))
      cache = MaskedDenseCache(vis=vis, model_config=cfg, quant_dtype=quant_dtype)
      return jnp.stack([p.transpose(1, 0, 2) for p in _forward(nnx.merge(graphdef, state), tokens, cache)[1].probs])
    _JIT[key] = jax.jit(run)
  return np.asarray(_JIT[key](state, jnp.asarray(tokens, jnp.int32)))


def streaming_visibility(n: int, layers: int, kv_heads: int, sinks: int, window: int, stream_heads=None):
  """vis [layers, N, kv_heads, N]: causal, and on streaming heads j < sinks or i - j < window."""
  i = np.arange(n)[:, None]
  j = np.arange(n)[None, :]
  causal = j <= i
  stream = causal & ((j < sinks) | (i - j < window))
  heads = np.ones((layers, kv_heads), bool) if stream_heads is None else np.asarray(stream_heads, bool)
  return np.where(heads[:, None, :, None], stream[None, :, None, :], causal[None, :, None, :])


def cache_sink_shift(n: int, sinks: int, window: int) -> np.ndarray:
  """[N]: StreamingLLM's cache positions put sink j of query i at j + max(0, i - window + 1 - sinks)."""
  return np.maximum(np.arange(n) - window + 1 - sinks, 0).astype(np.int32)
