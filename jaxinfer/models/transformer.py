"""One config-driven decoder-only Transformer (Llama 2/3, Mistral, Qwen2, Qwen3) in Flax NNX."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from jaxinfer.models.attention import attention
from jaxinfer.models.config import ModelConfig
from jaxinfer.models.kv_cache import KVCache
from jaxinfer.models.layers import Embed, Linear, RMSNorm
from jaxinfer.models.moe import make_mlp
from jaxinfer.models.rope import apply_rope, rope_cos_sin


def _dtypes(cfg: ModelConfig):
  return jnp.dtype(cfg.param_dtype), jnp.dtype(cfg.dtype)


class Attention(nnx.Module):
  def __init__(self, cfg: ModelConfig, layer: int, rngs: nnx.Rngs):
    pdt, dt = _dtypes(cfg)
    d, hd = cfg.hidden_size, cfg.resolved_head_dim
    qkv_bias = cfg.attention_bias or cfg.qkv_bias
    lin = dict(param_dtype=pdt, dtype=dt, init_std=cfg.initializer_range, rngs=rngs)
    self.q_proj = Linear(d, cfg.num_heads * hd, axes=("embed", "heads"), use_bias=qkv_bias, **lin)
    self.k_proj = Linear(d, cfg.num_kv_heads * hd, axes=("embed", "kv_heads"), use_bias=qkv_bias, **lin)
    self.v_proj = Linear(d, cfg.num_kv_heads * hd, axes=("embed", "kv_heads"), use_bias=qkv_bias, **lin)
    self.o_proj = Linear(cfg.num_heads * hd, d, axes=("heads", "embed"), use_bias=cfg.attention_bias, **lin)
    if cfg.qk_norm:
      self.q_norm = RMSNorm(hd, eps=cfg.rms_norm_eps, param_dtype=pdt, dtype=dt)
      self.k_norm = RMSNorm(hd, eps=cfg.rms_norm_eps, param_dtype=pdt, dtype=dt)
    else:
      self.q_norm = self.k_norm = None
    self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, hd
    self.window = cfg.layer_window(layer)
    self.implementation = cfg.attention_impl
    self.layer = layer

  def __call__(self, x, cos, sin, positions, segment_ids, cache: KVCache | None):
    b, s, _ = x.shape
    q = self.q_proj(x).reshape(b, s, self.num_heads, self.head_dim)
    k = self.k_proj(x).reshape(b, s, self.num_kv_heads, self.head_dim)
    v = self.v_proj(x).reshape(b, s, self.num_kv_heads, self.head_dim)
    if self.q_norm is not None:
      q, k = self.q_norm(q), self.k_norm(k)
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    if cache is None:
      out = attention(q, k, v, q_positions=positions, kv_positions=positions, q_segment_ids=segment_ids,
                      kv_segment_ids=segment_ids, sliding_window=self.window, implementation=self.implementation)
      layer_kv = None
    else:
      out, layer_kv = cache.attend(self.layer, q, k, v, positions=positions, segment_ids=segment_ids,
                                   sliding_window=self.window, implementation=self.implementation)
    return self.o_proj(out.reshape(b, s, self.num_heads * self.head_dim)), layer_kv


class MLP(nnx.Module):
  def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
    pdt, dt = _dtypes(cfg)
    lin = dict(use_bias=cfg.mlp_bias, param_dtype=pdt, dtype=dt, init_std=cfg.initializer_range, rngs=rngs)
    self.gate_proj = Linear(cfg.hidden_size, cfg.intermediate_size, axes=("embed", "mlp"), **lin)
    self.up_proj = Linear(cfg.hidden_size, cfg.intermediate_size, axes=("embed", "mlp"), **lin)
    self.down_proj = Linear(cfg.intermediate_size, cfg.hidden_size, axes=("mlp", "embed"), **lin)

  def __call__(self, x):
    return self.down_proj(jax.nn.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nnx.Module):
  def __init__(self, cfg: ModelConfig, layer: int, rngs: nnx.Rngs):
    pdt, dt = _dtypes(cfg)
    self.input_layernorm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, param_dtype=pdt, dtype=dt)
    self.self_attn = Attention(cfg, layer, rngs)
    self.post_attention_layernorm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, param_dtype=pdt, dtype=dt)
    self.mlp = make_mlp(cfg, layer, rngs)  # dense SwiGLU or MoE block, by config (jaxinfer/models/moe.py)

  def __call__(self, x, cos, sin, positions, segment_ids, cache):
    attn, layer_kv = self.self_attn(self.input_layernorm(x), cos, sin, positions, segment_ids, cache)
    x = x + attn
    return x + self.mlp(self.post_attention_layernorm(x)), layer_kv


class Transformer(nnx.Module):
  """tokens [batch, seq] -> logits [batch, seq, vocab] (float32).

    logits = model(tokens)                                  # no cache: logits
    logits, cache = model(tokens, positions, segments, cache)   # with a cache: logits and the updated cache
    hidden = model(tokens, return_hidden=True)              # final hidden states (after the final norm)
    logits = model.logits(hidden[:, rows])                  # the lm_head on any rows of hidden states

  positions default to arange(seq); segment_ids (packing) default to one segment. With a KVCache the new
  tokens are stored in the cache and attend to everything it holds; the updated cache is returned. Any
  object with the begin / attend / finish protocol of KVCache works (the engine's paged cache does).
  `return_hidden=True` returns the hidden states [batch, seq, hidden] in place of the logits (the engine
  applies the lm_head only to the rows it samples; speculative heads read hidden states the same way).
  """

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    pdt, dt = _dtypes(cfg)
    self.config = cfg
    self.embed_tokens = Embed(cfg.vocab_size, cfg.hidden_size, param_dtype=pdt, dtype=dt,
                              init_std=cfg.initializer_range, rngs=rngs)
    self.layers = nnx.List([DecoderLayer(cfg, i, rngs) for i in range(cfg.num_layers)])
    self.norm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, param_dtype=pdt, dtype=dt)
    if cfg.tie_word_embeddings:
      self.lm_head = None
    else:
      self.lm_head = Linear(cfg.hidden_size, cfg.vocab_size, axes=("embed", "vocab"), use_bias=False,
                            param_dtype=pdt, dtype=dt, init_std=cfg.initializer_range, rngs=rngs)

  def logits(self, hidden):
    """Hidden states [..., hidden] (after the final norm) -> float32 logits [..., vocab]: the lm_head, or the
    tied embedding's transpose."""
    logits = self.embed_tokens.attend(hidden) if self.lm_head is None else self.lm_head(hidden)
    return logits.astype(jnp.float32)

  def __call__(self, tokens, positions=None, segment_ids=None, cache: KVCache | None = None, *,
               return_hidden: bool = False):
    b, s = tokens.shape
    if positions is None:
      start = 0 if cache is None else cache.index
      positions = jnp.broadcast_to(start + jnp.arange(s, dtype=jnp.int32), (b, s))
    if segment_ids is None and cache is not None:
      segment_ids = jnp.zeros((b, s), jnp.int32)
    if cache is not None:
      cache = cache.begin(positions, segment_ids)
    cos, sin = rope_cos_sin(positions, self.config)
    x = self.embed_tokens(tokens)
    layer_kvs = []
    for layer in self.layers:
      x, layer_kv = layer(x, cos, sin, positions, segment_ids, cache)
      layer_kvs.append(layer_kv)
    x = self.norm(x)
    out = x if return_hidden else self.logits(x)
    if cache is None:
      return out
    return out, cache.finish(layer_kvs, s)


def init_model(cfg: ModelConfig, seed: int = 0, mesh=None, rules=None) -> Transformer:
  """A randomly initialised Transformer; with a mesh, every parameter is created already sharded by its logical
  axes (rules: default parallel.sharding.DEFAULT_RULES, fitted to the model by jaxinfer.models.sharding), with
  the same random draws as on one device (the initialiser, compiled, may differ in the last bit)."""
  if mesh is None:
    return Transformer(cfg, rngs=nnx.Rngs(seed))
  from jaxinfer.models.sharding import model_rules
  from parallel.sharding import create_sharded_module

  model, _ = create_sharded_module(lambda: Transformer(cfg, rngs=nnx.Rngs(seed)), mesh, model_rules(cfg, mesh, rules))
  return model
