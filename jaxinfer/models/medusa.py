"""Medusa-1 decoding heads: K extra heads on a frozen base model's final hidden state (Cai et al., 2024).

Head k (k = 0 .. K-1) predicts the token k + 2 places after the position it reads (the base lm_head predicts
the next one): L residual blocks `x + silu(x @ W + b)` then its own projection to the vocabulary. As in the
paper's code, the residual blocks start at zero (identity) and each head's projection starts as a copy of the
base lm_head (`init_from_base`), so an untrained head predicts what the base predicts for the next token.

Parameters are stacked over heads (one einsum per layer for all heads). Files: `medusa_heads.safetensors` +
`medusa_config.json`, written beside the base model's Hugging Face export, with the tensor names and torch
layouts of the Medusa project's checkpoints (`medusa_head.{k}.{j}.linear.weight|bias`, `medusa_head.{k}.{L}.weight`).

  heads = MedusaHeads(MedusaConfig(num_heads=4, hidden_size=256, vocab_size=4096), rngs=nnx.Rngs(0))
  heads.init_from_base(model)
  logits = heads(hidden)                     # hidden [..., D] (after the final norm) -> [..., K, vocab] f32
  save_medusa_heads(heads, "results/quickstart/hf");  heads = load_medusa_heads("results/quickstart/hf")
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxinfer.checkpoint.atomic import write_atomic, write_text_atomic

WEIGHTS_FILE = "medusa_heads.safetensors"
CONFIG_FILE = "medusa_config.json"


@dataclasses.dataclass(frozen=True)
class MedusaConfig:
  num_heads: int = 4  # K: head k predicts the token k + 2 places ahead
  num_layers: int = 1  # residual blocks per head
  hidden_size: int = 256
  vocab_size: int = 4096
  param_dtype: str = "float32"
  dtype: str = "float32"

  def __post_init__(self):
    for name in ("num_heads", "num_layers", "hidden_size", "vocab_size"):
      value = getattr(self, name)
      if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"MedusaConfig.{name}: must be a positive integer, got {value!r}")

  @classmethod
  def for_model(cls, model_config, num_heads: int = 4, num_layers: int = 1) -> "MedusaConfig":
    return cls(num_heads=num_heads, num_layers=num_layers, hidden_size=model_config.hidden_size,
               vocab_size=model_config.vocab_size, param_dtype=model_config.param_dtype, dtype=model_config.dtype)


class MedusaHeads(nnx.Module):
  def __init__(self, cfg: MedusaConfig, *, rngs: nnx.Rngs):
    self.config = cfg
    k, n, d, v = cfg.num_heads, cfg.num_layers, cfg.hidden_size, cfg.vocab_size
    pdt = jnp.dtype(cfg.param_dtype)
    self.res_kernel = nnx.Param(jnp.zeros((k, n, d, d), pdt))  # zero: each block starts as the identity
    self.res_bias = nnx.Param(jnp.zeros((k, n, d), pdt))
    self.out_kernel = nnx.Param(0.02 * jax.random.normal(rngs.params(), (k, d, v), pdt))

  @property
  def num_heads(self) -> int:
    return self.config.num_heads

  def init_from_base(self, model) -> None:
    """Every head's projection becomes a copy of the base model's lm_head (the tied embedding if none)."""
    w = model.embed_tokens.embedding[...].T if model.lm_head is None else model.lm_head.kernel[...]
    if not hasattr(w, "shape") or tuple(w.shape) != tuple(self.out_kernel.shape[1:]):
      raise ValueError(f"init_from_base: the base lm_head is {getattr(w, 'shape', type(w))}, the heads need "
                       f"{tuple(self.out_kernel.shape[1:])} (hidden_size, vocab_size)")
    self.out_kernel[...] = jnp.broadcast_to(w.astype(self.out_kernel.dtype), self.out_kernel.shape)

  def __call__(self, hidden, num_heads: int | None = None):
    """hidden [..., D] (the base model's final hidden states) -> float32 logits [..., K, vocab]; num_heads:
    only the first heads (a shallower candidate tree needs no more)."""
    k = self.num_heads if num_heads is None else num_heads
    dt = jnp.dtype(self.config.dtype)
    x = jnp.broadcast_to(hidden.astype(dt)[..., None, :], (*hidden.shape[:-1], k, hidden.shape[-1]))
    w, b = self.res_kernel[:k].astype(dt), self.res_bias[:k].astype(dt)
    for j in range(self.config.num_layers):
      x = x + jax.nn.silu(jnp.einsum("...kd,kde->...ke", x, w[:, j]) + b[:, j])
    return jnp.einsum("...kd,kdv->...kv", x, self.out_kernel[:k].astype(dt)).astype(jnp.float32)


# ---------------------------------------------------------------------------------------------- files
def _tensors(heads: MedusaHeads) -> dict[str, np.ndarray]:
  cfg = heads.config
  out = {}
  rk, rb, ok = (np.asarray(p[...], np.float32) for p in (heads.res_kernel, heads.res_bias, heads.out_kernel))
  for k in range(cfg.num_heads):
    for j in range(cfg.num_layers):
      out[f"medusa_head.{k}.{j}.linear.weight"] = np.ascontiguousarray(rk[k, j].T)  # torch Linear: [out, in]
      out[f"medusa_head.{k}.{j}.linear.bias"] = rb[k, j]
    out[f"medusa_head.{k}.{cfg.num_layers}.weight"] = np.ascontiguousarray(ok[k].T)
  return out


def save_medusa_heads(heads: MedusaHeads, directory: str | os.PathLike) -> Path:
  """Writes medusa_heads.safetensors and medusa_config.json into `directory` (atomically); returns the weights."""
  import safetensors.numpy

  directory = Path(directory)
  directory.mkdir(parents=True, exist_ok=True)
  cfg = heads.config
  tensors = _tensors(heads)  # float32 on disk whatever the compute dtype
  target = directory / WEIGHTS_FILE
  write_atomic(target, lambda tmp: safetensors.numpy.save_file(tensors, tmp, metadata={"format": "medusa-1"}))
  meta = {"medusa_num_heads": cfg.num_heads, "medusa_num_layers": cfg.num_layers, "hidden_size": cfg.hidden_size,
          "vocab_size": cfg.vocab_size, "param_dtype": cfg.param_dtype, "dtype": cfg.dtype}
  write_text_atomic(directory / CONFIG_FILE, json.dumps(meta, indent=2) + "\n")
  return target


def medusa_files(path: str | os.PathLike) -> tuple[Path, Path]:
  """(weights, config) for a directory holding them or the weights file itself; FileNotFoundError if absent."""
  path = Path(path)
  weights = path / WEIGHTS_FILE if path.is_dir() else path
  config = weights.parent / CONFIG_FILE
  for f in (weights, config):
    if not f.is_file():
      raise FileNotFoundError(f"Medusa heads: {f} not found (train them with `jaxinfer train --config "
                              f"experiments/medusa.py`, which writes {WEIGHTS_FILE} and {CONFIG_FILE} beside the base)")
  return weights, config


def load_medusa_heads(path: str | os.PathLike, model_config=None) -> MedusaHeads:
  """Reads heads written by save_medusa_heads (or the Medusa project's layout with a medusa_config.json).
  With model_config, a hidden or vocabulary size that differs from the base model's is an error."""
  from safetensors import safe_open

  weights, config = medusa_files(path)
  meta = json.loads(config.read_text())
  cfg = MedusaConfig(num_heads=int(meta["medusa_num_heads"]), num_layers=int(meta.get("medusa_num_layers", 1)),
                     hidden_size=int(meta["hidden_size"]), vocab_size=int(meta["vocab_size"]),
                     param_dtype=meta.get("param_dtype", "float32"), dtype=meta.get("dtype", "float32"))
  if model_config is not None:
    for name in ("hidden_size", "vocab_size"):
      if getattr(cfg, name) != getattr(model_config, name):
        raise ValueError(f"Medusa heads {weights}: {name}={getattr(cfg, name)} but the base model has "
                         f"{name}={getattr(model_config, name)}")
  heads = MedusaHeads(cfg, rngs=nnx.Rngs(0))
  k, n, d, v = cfg.num_heads, cfg.num_layers, cfg.hidden_size, cfg.vocab_size
  rk, rb, ok = np.zeros((k, n, d, d), np.float32), np.zeros((k, n, d), np.float32), np.zeros((k, d, v), np.float32)
  with safe_open(str(weights), framework="numpy") as f:
    names = set(f.keys())

    def get(name, shape):
      if name not in names:
        raise ValueError(f"Medusa heads {weights}: tensor {name!r} is missing")
      t = f.get_tensor(name)
      if tuple(t.shape) != shape:
        raise ValueError(f"Medusa heads {weights}: {name} has shape {tuple(t.shape)}, expected {shape}")
      return t.astype(np.float32)

    for i in range(k):
      for j in range(n):
        rk[i, j] = get(f"medusa_head.{i}.{j}.linear.weight", (d, d)).T
        rb[i, j] = get(f"medusa_head.{i}.{j}.linear.bias", (d,))
      ok[i] = get(f"medusa_head.{i}.{n}.weight", (v, d)).T
  pdt = jnp.dtype(cfg.param_dtype)
  heads.res_kernel[...], heads.res_bias[...], heads.out_kernel[...] = (jnp.asarray(a, pdt) for a in (rk, rb, ok))
  return heads
