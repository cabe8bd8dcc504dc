"""Hugging Face names of MoE tensors (Mixtral, Qwen2-MoE, Qwen3-MoE), and stacking them into our layout.

Our expert weights are stacked: layers.i.mlp.experts.{gate_proj, up_proj} [E, d, f], down_proj [E, f, d].
transformers' checkpoints hold one torch Linear weight [out, in] per expert:

  mixtral:              model.layers.i.block_sparse_moe.experts.N.{w1, w3, w2}.weight  (gate, up, down)
                        model.layers.i.block_sparse_moe.gate.weight                     (router [E, d])
  qwen2_moe, qwen3_moe: model.layers.i.mlp.experts.N.{gate_proj, up_proj, down_proj}.weight
                        model.layers.i.mlp.gate.weight                                  (router)
  qwen2_moe only:       model.layers.i.mlp.shared_expert.{gate_proj, up_proj, down_proj}.weight,
                        model.layers.i.mlp.shared_expert_gate.weight [1, d]

The Qwen router and shared-expert names are what the generic hf.hf_name already gives, so only the stacked
experts (and Mixtral's renamed router) are handled here. A `MoESource` reads any index block of our layout
from the per-expert tensors (`read(index)`, touching only the experts the block covers), so a sharded loader
can read each device's shard directly.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import numpy as np

from jaxinfer.models.config import ModelConfig

_MIXTRAL_EXPERT = {"gate_proj": "w1", "up_proj": "w3", "down_proj": "w2"}


@dataclasses.dataclass(frozen=True)
class MoESource:
  """One of our parameters made of HF tensors: `names` (one per expert when stacked), each the transpose of
  its slice of ours; `shape` is ours."""
  names: tuple[str, ...]
  stacked: bool
  shape: tuple[int, ...]

  def hf_shape(self) -> tuple[int, ...]:
    return tuple(self.shape[1:][::-1]) if self.stacked else tuple(self.shape[::-1])

  def read(self, read_tensor: Callable[[str], np.ndarray], index: tuple[slice, ...] | None = None) -> np.ndarray:
    """The block `index` (slices of our shape; None: all) read through `read_tensor(name) -> np.ndarray`."""
    index = tuple(index or ()) + (slice(None),) * (len(self.shape) - len(index or ()))
    if not self.stacked:
      return np.ascontiguousarray(read_tensor(self.names[0]).T[index])
    experts = range(self.shape[0])[index[0]]
    return np.stack([read_tensor(self.names[e]).T[index[1:]] for e in experts])


def _prefix(cfg: ModelConfig, layer: int) -> str:
  return f"model.layers.{layer}.{'block_sparse_moe' if cfg.model_type == 'mixtral' else 'mlp'}"


def moe_source(cfg: ModelConfig, path: tuple, shape: tuple[int, ...]) -> MoESource | None:
  """The HF tensors behind one of our parameter paths, if it is an MoE-specific one (else None)."""
  parts = tuple(str(p) for p in path)
  if len(parts) < 5 or parts[0] != "layers" or parts[2] != "mlp" or not cfg.is_moe_layer(int(parts[1])):
    return None
  prefix = _prefix(cfg, int(parts[1]))
  if parts[3] == "experts":
    leaf = _MIXTRAL_EXPERT[parts[4]] if cfg.model_type == "mixtral" else parts[4]
    names = tuple(f"{prefix}.experts.{e}.{leaf}.weight" for e in range(cfg.num_experts))
    return MoESource(names, True, tuple(shape))
  if parts[3:] == ("gate", "kernel") and cfg.model_type == "mixtral":
    return MoESource((f"{prefix}.gate.weight",), False, tuple(shape))
  return None


def moe_sources(cfg: ModelConfig, params: dict) -> dict[tuple, MoESource]:
  """path -> MoESource for every parameter of `params` (path -> nnx.Variable) that hf_moe names."""
  out = {}
  for path, var in params.items():
    source = moe_source(cfg, path, tuple(var.get_value().shape))
    if source is not None:
      out[path] = source
  return out


def expected_names(sources: dict[tuple, MoESource]) -> set[str]:
  return {name for s in sources.values() for name in s.names}


def save_tensors(cfg: ModelConfig, params: dict) -> dict[str, np.ndarray]:
  """HF name -> array (torch layout) for every MoE parameter of `params` (path -> nnx.Variable)."""
  import jax

  out = {}
  for path, var in params.items():
    value = np.asarray(jax.device_get(var.get_value()))
    source = moe_source(cfg, path, value.shape)
    if source is None:
      continue
    if source.stacked:
      for e, name in enumerate(source.names):
        out[name] = np.ascontiguousarray(value[e].T)
    else:
      out[source.names[0]] = np.ascontiguousarray(value.T)
  return out
