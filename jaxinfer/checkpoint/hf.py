"""Hugging Face interchange in safetensors (never pickle): config.json + model.safetensors (or a sharded index).

GPTQ checkpoints (config.json `quantization_config` with quant_method "gptq", the AutoGPTQ / GPTQModel layout of
jaxinfer/quant/gptq_format.py) load into Linear layers with quantized kernels; save_hf writes that layout for
models quantized group-wise to 4 or 8 bits (jaxinfer.quantize with "rtn", "gptq" or "int8").
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import safetensors.flax
from flax import nnx
from safetensors import SafetensorError, safe_open

from jaxinfer.checkpoint import hf_moe
from jaxinfer.checkpoint.atomic import write_atomic
from jaxinfer.config import ConfigError
from jaxinfer.models.config import ModelConfig
from jaxinfer.models.transformer import Transformer

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


class CheckpointError(ValueError):
  """A checkpoint is missing, corrupt, or disagrees with its config; the message names the file or tensor."""


# ------------------------------------------------------------------------------------------ names
def hf_name(path: tuple) -> tuple[str, bool]:
  """Our state path -> (Hugging Face tensor name, whether the array is transposed between the two)."""
  parts = [str(p) for p in path]
  leaf = parts[-1]
  transposed = leaf == "kernel"
  if parts[:2] == ["embed_tokens", "embedding"]:
    return "model.embed_tokens.weight", False
  name = ".".join(parts[:-1] + ["weight" if leaf in ("kernel", "weight") else leaf])
  return (name if parts[0] == "lm_head" else "model." + name), transposed


def _flat_params(model_or_state) -> dict[tuple, nnx.Variable]:
  state = model_or_state if isinstance(model_or_state, nnx.State) else nnx.state(model_or_state, nnx.Param)
  return dict(nnx.to_flat_state(state))


# ------------------------------------------------------------------------------------------ loading
def read_config(path: str | os.PathLike, **overrides) -> ModelConfig:
  config_path = Path(path) / CONFIG_FILE
  if not config_path.is_file():
    raise CheckpointError(f"{config_path}: no config.json in the checkpoint directory {path}")
  try:
    hf = json.loads(config_path.read_text())
  except json.JSONDecodeError as e:
    raise CheckpointError(f"{config_path}: not valid JSON ({e})") from e
  if not isinstance(hf, dict):
    raise CheckpointError(f"{config_path}: expected a JSON object")
  try:
    return ModelConfig.from_hf(hf, **overrides)
  except KeyError as e:
    raise CheckpointError(f"{config_path}: missing field {e.args[0]!r}") from e


def _weight_files(path: Path) -> dict[str, Path]:
  """Tensor name -> the safetensors file that holds it."""
  index = path / INDEX_FILE
  if index.is_file():
    try:
      weight_map = json.loads(index.read_text())["weight_map"]
    except (json.JSONDecodeError, KeyError) as e:
      raise CheckpointError(f"{index}: not a valid safetensors index ({e})") from e
    return {name: path / file for name, file in weight_map.items()}
  single = path / WEIGHTS_FILE
  if not single.is_file():
    found = sorted(p.name for p in path.iterdir()) if path.is_dir() else []
    hint = " (PyTorch .bin checkpoints are not read: they are pickles; convert to safetensors)" if any(
        f.endswith(".bin") for f in found) else ""
    raise CheckpointError(f"{path}: neither {WEIGHTS_FILE} nor {INDEX_FILE} found{hint}")
  try:
    with safe_open(single, framework="flax") as f:
      return {name: single for name in f.keys()}
  except (SafetensorError, OSError) as e:
    raise CheckpointError(f"{single}: corrupt or unreadable safetensors file ({e})") from e


def load_hf(path: str | os.PathLike, dtype: str | None = None, mesh=None, rules=None,
            **config_overrides) -> Transformer:
  """Reads a Hugging Face Llama-family checkpoint directory into a Transformer.

  dtype: parameter and compute dtype ("float32", "bfloat16"); None keeps the checkpoint's own dtype.
  mesh, rules: with a mesh, every float parameter is created sharded by its logical axes (rules: default
  parallel.sharding.DEFAULT_RULES, fitted by jaxinfer.models.sharding.model_rules); each device's block is read
  straight from the file (jaxinfer/checkpoint/tensor_source.py), never a full copy on one device. GPTQ kernels
  are read whole on the host and replicated over the mesh (not sharded).
  """
  path = Path(path)
  if not path.is_dir():
    raise CheckpointError(f"{path}: checkpoint directory does not exist")
  hf = json.loads((path / CONFIG_FILE).read_text()) if (path / CONFIG_FILE).is_file() else {}
  ckpt_dtype = hf.get("torch_dtype") or hf.get("dtype") or "float32"
  dtype = dtype or (ckpt_dtype if ckpt_dtype in ("float32", "bfloat16", "float16") else "float32")
  cfg = read_config(path, **{"param_dtype": dtype, "dtype": dtype, **config_overrides})
  table = None
  if mesh is not None:
    from jaxinfer.models.sharding import model_rules

    table = model_rules(cfg, mesh, rules)  # a mesh the model cannot use fails before any tensor is read
  gptq = _gptq_settings(hf, path)
  abstract = nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0)))
  graphdef, state = nnx.split(abstract)
  files = _weight_files(path)
  params = _flat_params(state)
  quantized = _quantized_kernels(params, files) if gptq else {}
  params = {p: v for p, v in params.items() if p not in quantized}
  moe = hf_moe.moe_sources(cfg, params)  # stacked experts: several HF tensors per parameter
  moe_params, params = {p: params[p] for p in moe}, {p: v for p, v in params.items() if p not in moe}
  expected = {hf_name(p)[0] for p in params} | {f"{prefix}.{t}" for prefix in quantized.values() for t in GPTQ_TENSORS}
  expected |= hf_moe.expected_names(moe)
  missing = sorted(expected - set(files))
  if missing:
    raise CheckpointError(f"{path}: tensors missing from the checkpoint: {', '.join(missing[:8])}"
                          + (" ..." if len(missing) > 8 else ""))
  unexpected = sorted(n for n in set(files) - expected if not n.endswith("rotary_emb.inv_freq"))
  if unexpected:
    raise CheckpointError(f"{path}: tensors the config has no place for: {', '.join(unexpected[:8])}"
                          + (" ..." if len(unexpected) > 8 else ""))
  handles = {}
  try:
    for file in sorted(set(files[hf_name(p)[0]] for p in params) | {files[n] for n in hf_moe.expected_names(moe)}):
      if not file.is_file():
        raise CheckpointError(f"{file}: shard listed in {INDEX_FILE} does not exist")
      try:
        handles[file] = safe_open(file, framework="numpy").__enter__()
      except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{file}: corrupt or unreadable safetensors file ({e})") from e
    for p, var in params.items():
      name, transposed = hf_name(p)
      source = _source(handles[files[name]], name, transposed, var, files[name])
      var.set_value(_assemble(source, _sharding(var, mesh, table, name, files[name]), name, files[name]))
    for p, var in moe_params.items():  # stacked experts: one source over several HF tensors, sharded the same way
      source = _moe_source(moe[p], handles, files, var)
      var.set_value(_assemble(source, _sharding(var, mesh, table, source.name, files[source.name]), source.name,
                              files[source.name]))
    model = nnx.merge(graphdef, state)
    _load_quantized(model, quantized, files, gptq, path)
  finally:
    for handle in handles.values():
      handle.__exit__(None, None, None)
  if mesh is not None and quantized:
    model = _replicate_rest(model, mesh)
  return model


def _source(handle, name: str, transposed: bool, var, file: Path):
  from jaxinfer.checkpoint.tensor_source import HFTensor

  value = var.get_value()
  try:
    source = HFTensor(handle, name, transposed, value.dtype)
  except SafetensorError as e:
    raise CheckpointError(f"{file}: tensor {name} unreadable ({e})") from e
  if source.shape != tuple(value.shape):
    hf_shape = source.shape[::-1] if transposed else source.shape
    want = value.shape[::-1] if transposed else value.shape
    raise CheckpointError(f"{file}: tensor {name} has shape {hf_shape}, but config.json implies {tuple(want)}")
  return source


class _StackedExperts:
  """A TensorSource over hf_moe's per-expert tensors: a block reads only the experts it covers."""

  def __init__(self, moe_source, read_tensor, dtype):
    self.moe_source, self.read_tensor = moe_source, read_tensor
    self.name = moe_source.names[0]
    self.shape, self.dtype = tuple(moe_source.shape), np.dtype(dtype)

  def read(self, index):
    return self.moe_source.read(self.read_tensor, index).astype(self.dtype, copy=False)


def _moe_source(moe_source, handles, files, var):
  for name in moe_source.names:
    try:
      shape = tuple(handles[files[name]].get_slice(name).get_shape())
    except SafetensorError as e:
      raise CheckpointError(f"{files[name]}: tensor {name} unreadable ({e})") from e
    if shape != moe_source.hf_shape():
      raise CheckpointError(f"{files[name]}: tensor {name} has shape {shape}, but config.json implies "
                            f"{moe_source.hf_shape()}")

  def read_tensor(name):
    try:
      return handles[files[name]].get_tensor(name)
    except SafetensorError as e:
      raise CheckpointError(f"{files[name]}: tensor {name} is corrupt ({e})") from e

  return _StackedExperts(moe_source, read_tensor, var.get_value().dtype)


def _sharding(var, mesh, table, name: str, file: Path):
  """Where the parameter goes: the default device without a mesh, else its logical-axis sharding (an axis
  that does not divide over the mesh is a CheckpointError naming the tensor and the axis)."""
  if mesh is None:
    return jax.sharding.SingleDeviceSharding(jax.devices()[0])
  from jax.sharding import NamedSharding

  from parallel.mesh import ParallelConfigError
  from parallel.sharding import logical_to_spec

  axes = var.get_metadata().get("logical_axes")
  shape = var.get_value().shape
  if axes is None:
    return NamedSharding(mesh, jax.sharding.PartitionSpec())
  try:
    return NamedSharding(mesh, logical_to_spec(axes, table, mesh, shape, name=f"tensor {name}"))
  except ParallelConfigError as e:
    raise CheckpointError(f"{file}: {e}") from None


def _assemble(source, sharding, name: str, file: Path):
  from jaxinfer.checkpoint.tensor_source import assemble

  try:
    return assemble(source, sharding)
  except SafetensorError as e:
    raise CheckpointError(f"{file}: tensor {name} is corrupt ({e})") from e


def _replicate_rest(model, mesh):
  """Arrays not on the mesh yet (GPTQ kernels, read whole) replicated over it, so one jit sees one mesh."""
  from jax.sharding import NamedSharding, PartitionSpec

  graphdef, state = nnx.split(model)
  replicated = NamedSharding(mesh, PartitionSpec())

  def place(x):
    on_mesh = isinstance(getattr(x, "sharding", None), NamedSharding) and x.sharding.mesh == mesh
    return x if on_mesh or not hasattr(x, "shape") else jax.device_put(x, replicated)

  return nnx.merge(graphdef, jax.tree.map(place, state))


# ------------------------------------------------------------------------------------------ GPTQ
GPTQ_TENSORS = ("qweight", "qzeros", "scales", "g_idx")


def _gptq_settings(hf: dict, path: Path) -> dict | None:
  """The checked quantization_config of a GPTQ checkpoint (None for a float one)."""
  if "quantization_config" not in hf:
    return None
  from jaxinfer.quant.gptq_format import GPTQFormatError, read_quantization_config

  try:
    return read_quantization_config(hf["quantization_config"], str(path / CONFIG_FILE))
  except GPTQFormatError as e:
    raise CheckpointError(str(e)) from None


def _quantized_kernels(params, files) -> dict[tuple, str]:
  """Kernel state path -> HF prefix, for every Linear kernel stored as GPTQ tensors (prefix.qweight present)."""
  out = {}
  for p in params:
    name, transposed = hf_name(p)
    prefix = name[:-len(".weight")]
    if transposed and f"{prefix}.qweight" in files:
      out[p] = prefix
  return out


def _load_quantized(model, quantized: dict[tuple, str], files, gptq: dict, path: Path) -> None:
  from jaxinfer.quant.gptq_format import GPTQFormatError, from_tensors

  for p, prefix in quantized.items():
    linear = _module_at(model, p[:-1])
    var = linear.kernel
    rows, out = var.get_value().shape
    tensors = {}
    for t in GPTQ_TENSORS:
      name = f"{prefix}.{t}"
      if not files[name].is_file():
        raise CheckpointError(f"{files[name]}: shard listed in {INDEX_FILE} does not exist")
      try:
        with safe_open(files[name], framework="numpy") as f:
          tensors[t] = f.get_tensor(name)
      except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{files[name]}: tensor {name} is corrupt ({e})") from e
    try:
      linear.kernel = from_tensors(tensors, rows=rows, out=out, cfg=gptq, prefix=prefix,
                                   axes=var.get_metadata().get("logical_axes", (None, None)))
    except GPTQFormatError as e:
      raise CheckpointError(f"{path}: {e}") from None


def _module_at(model, path: tuple):
  module = model
  for part in path:
    module = module[part] if isinstance(part, int) else getattr(module, part)
  return module


def _quantized_linears(model) -> dict[tuple, object]:
  """Kernel path -> quantized weight module, for every Linear whose kernel is not a float Param."""
  from jaxinfer.models.layers import Linear

  return {tuple(p) + ("kernel",): m.kernel for p, m in nnx.iter_modules(model)
          if isinstance(m, Linear) and not isinstance(m.kernel, nnx.Variable)}


# ------------------------------------------------------------------------------------------ saving
def _gptq_tensors(quantized: dict[tuple, object], hf_config: dict) -> dict:
  """The GPTQ tensors of every quantized linear (named as transformers names the float ones), and
  quantization_config added to hf_config; ConfigError naming the layer when the model has no GPTQ layout."""
  from jaxinfer.quant import gptq_format as G

  names = {p: hf_name(p)[0][:-len(".weight")] for p in quantized}
  try:
    bits, group_size, sym, desc_act = G.model_settings({names[p]: k for p, k in quantized.items()})
    fmt = G.choose_format(quantized.values())
    tensors = {}
    for p, kernel in quantized.items():
      for t, value in G.to_tensors(kernel, fmt).items():
        tensors[f"{names[p]}.{t}"] = jnp.asarray(value)
  except G.GPTQFormatError as e:
    raise ConfigError(str(e) if str(e).startswith("save_hf") else f"save_hf: {e}") from None
  hf_config["quantization_config"] = G.quantization_config(bits, group_size, sym, desc_act, fmt)
  return tensors


def save_hf(model: Transformer, path: str | os.PathLike) -> Path:
  """Writes config.json + model.safetensors that transformers' from_pretrained loads (a quantized model: the GPTQ
  layout, with quantization_config in config.json and no float .weight beside the quantized tensors)."""
  cfg: ModelConfig = model.config
  try:
    cfg.check_supported_combination()
  except ConfigError as e:
    raise ConfigError(f"save_hf: {e}") from e
  quantized = _quantized_linears(model)
  hf_config = cfg.to_hf()
  tensors = _gptq_tensors(quantized, hf_config) if quantized else {}
  path = Path(path)
  path.mkdir(parents=True, exist_ok=True)
  moe = hf_moe.save_tensors(cfg, _flat_params(model))
  tensors.update({name: jnp.asarray(value) for name, value in moe.items()})
  for p, var in _flat_params(model).items():
    if any(p[:len(q)] == q for q in quantized) or hf_moe.moe_source(cfg, p, var.get_value().shape):
      continue
    name, transposed = hf_name(p)
    value = jax.device_get(var.get_value())
    tensors[name] = jnp.asarray(np.ascontiguousarray(value.T if transposed else value))
  write_atomic(path / WEIGHTS_FILE, lambda tmp: safetensors.flax.save_file(tensors, tmp, metadata={"format": "pt"}))
  config_text = json.dumps(hf_config, indent=2, sort_keys=True)
  write_atomic(path / CONFIG_FILE, lambda tmp: Path(tmp).write_text(config_text))
  stale_index = path / INDEX_FILE
  if stale_index.exists():
    os.remove(stale_index)  # a single-file checkpoint now replaces an earlier sharded one
  return path


def load_tokenizer(path: str | os.PathLike):
  """A tokenizers.Tokenizer from tokenizer.json (or a directory holding one)."""
  from tokenizers import Tokenizer

  path = Path(path)
  file = path / "tokenizer.json" if path.is_dir() else path
  if not file.is_file():
    raise CheckpointError(f"{file}: no tokenizer.json found")
  try:
    return Tokenizer.from_file(str(file))
  except Exception as e:  # tokenizers raises plain Exception subclasses from Rust
    raise CheckpointError(f"{file}: not a valid tokenizer.json ({e})") from e
