"""Rotary position embeddings with the scalings Hugging Face Llama checkpoints use (default, linear, llama3)."""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np

from jaxinfer.models.config import ModelConfig


def inverse_frequencies(cfg: ModelConfig) -> np.ndarray:
  """Per-pair rotation frequencies [head_dim // 2] in float32, computed once on the host."""
  dim = cfg.resolved_head_dim
  inv_freq = 1.0 / (cfg.rope_theta ** (np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / dim))
  if cfg.rope_type == "linear":
    return (inv_freq / cfg.rope_factor).astype(np.float32)
  if cfg.rope_type == "llama3":
    return _llama3_scaling(inv_freq, cfg).astype(np.float32)
  return inv_freq.astype(np.float32)


def _llama3_scaling(inv_freq: np.ndarray, cfg: ModelConfig) -> np.ndarray:
  # Long wavelengths are divided by the factor, short ones kept, the band between interpolated smoothly.
  factor, low, high = cfg.rope_factor, cfg.rope_low_freq_factor, cfg.rope_high_freq_factor
  old_len = cfg.rope_original_max_position
  low_freq_wavelen, high_freq_wavelen = old_len / low, old_len / high
  wavelen = 2 * math.pi / inv_freq
  scaled = np.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
  smooth = (old_len / wavelen - low) / (high - low)
  smoothed = (1 - smooth) * scaled / factor + smooth * scaled
  is_medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
  return np.where(is_medium, smoothed, scaled)


def rope_cos_sin(positions, cfg: ModelConfig):
  """cos, sin of shape [batch, seq, head_dim] in float32 for int positions [batch, seq]."""
  inv_freq = jnp.asarray(inverse_frequencies(cfg))
  freqs = positions.astype(jnp.float32)[..., None] * inv_freq
  emb = jnp.concatenate([freqs, freqs], axis=-1)
  return jnp.cos(emb), jnp.sin(emb)


def apply_rope(x, cos, sin):
  """x [batch, seq, heads, head_dim]; rotates halves (the Hugging Face convention)."""
  half = x.shape[-1] // 2
  rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
  cos = cos[:, :, None, :].astype(x.dtype)
  sin = sin[:, :, None, :].astype(x.dtype)
  return x * cos + rotated * sin
