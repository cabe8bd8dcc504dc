"""The AutoGPTQ / GPTQModel safetensors layout of one quantized linear (numpy), and its quantization_config.

Per linear `prefix` (e.g. model.layers.0.self_attn.q_proj), with `pack = 32 // bits` codes per int32:
  prefix.qweight  int32 [in / pack, out]: code of input row i, output o = (qweight[i // pack, o] >> (bits *
                  (i % pack))) & (2**bits - 1)   (rows in the original input order)
  prefix.qzeros   int32 [groups, out / pack]: zero point of (g, o) packed the same way along out; checkpoint
                  format "gptq" (v1) stores zero - 1, "gptq_v2" the zero itself
  prefix.scales   float16 [groups, out]
  prefix.g_idx    int32 [in]: the group of each input row (i // group_size, or GPTQ's act-order groups)
  W[i, o] = (code[i, o] - zero[g_idx[i], o]) * scales[g_idx[i], o]
"""

from __future__ import annotations

import logging

import numpy as np

from jaxinfer.quant.weights import GroupQuantizedKernel

logger = logging.getLogger(__name__)

SUPPORTED_BITS = (4, 8)
FORMATS = ("gptq", "gptq_v2")


class GPTQFormatError(ValueError):
  """A GPTQ tensor or quantization_config disagrees with the layout (the message names it)."""


def pack_along(values: np.ndarray, bits: int, axis: int) -> np.ndarray:
  """Unsigned integers < 2**bits -> int32, `32 // bits` consecutive entries along `axis` per int32."""
  pack = 32 // bits
  v = np.moveaxis(np.asarray(values, np.uint32), axis, 0)
  if v.shape[0] % pack:
    raise GPTQFormatError(f"{v.shape[0]} entries along axis {axis} are not a multiple of {pack} ({bits}-bit)")
  v = v.reshape(v.shape[0] // pack, pack, *v.shape[1:])
  out = np.zeros(v.shape[:1] + v.shape[2:], np.uint32)
  for t in range(pack):
    out |= v[:, t] << np.uint32(bits * t)
  return np.moveaxis(out.view(np.int32), 0, axis)


def unpack_along(packed: np.ndarray, bits: int, axis: int) -> np.ndarray:
  """The inverse of pack_along: int32 -> int64 values, `32 // bits` times longer along `axis`."""
  pack = 32 // bits
  p = np.moveaxis(np.asarray(packed).view(np.uint32), axis, 0)
  planes = [(p >> np.uint32(bits * t)) & np.uint32(2 ** bits - 1) for t in range(pack)]
  out = np.stack(planes, axis=1).reshape(p.shape[0] * pack, *p.shape[1:])
  return np.moveaxis(out.astype(np.int64), 0, axis)


def quantization_config(bits: int, group_size: int, sym: bool, desc_act: bool, fmt: str) -> dict:
  return {"quant_method": "gptq", "bits": bits, "group_size": group_size, "sym": bool(sym), "desc_act": bool(desc_act),
          "checkpoint_format": fmt, "damp_percent": 0.01, "static_groups": False, "true_sequential": True,
          "lm_head": False}


def read_quantization_config(qc, where: str) -> dict:
  """(bits, group_size, sym, desc_act, format) of a config.json quantization_config, checked."""
  if not isinstance(qc, dict):
    raise GPTQFormatError(f"{where}: quantization_config must be an object, got {type(qc).__name__}")
  method = qc.get("quant_method")
  if method != "gptq":
    raise GPTQFormatError(f"{where}: quantization_config.quant_method {method!r} is not supported; supported: 'gptq'")
  bits, gs = qc.get("bits"), qc.get("group_size", -1)
  if bits not in SUPPORTED_BITS:
    raise GPTQFormatError(f"{where}: quantization_config.bits={bits!r} is not supported; supported: {SUPPORTED_BITS}")
  if not isinstance(gs, int) or (gs != -1 and gs < 2):
    raise GPTQFormatError(f"{where}: quantization_config.group_size={gs!r} must be -1 or an integer >= 2")
  fmt = qc.get("checkpoint_format", "gptq")
  if fmt not in FORMATS:
    raise GPTQFormatError(f"{where}: quantization_config.checkpoint_format {fmt!r} is not one of {FORMATS}")
  return dict(bits=bits, group_size=gs, sym=bool(qc.get("sym", True)), desc_act=bool(qc.get("desc_act", False)),
              format=fmt)


def to_tensors(kernel: GroupQuantizedKernel, fmt: str) -> dict[str, np.ndarray]:
  """qweight, qzeros, scales, g_idx of a quantized kernel (codes back in the original input order)."""
  rows, out = kernel.shape
  codes = np.asarray(kernel.stored_codes(), np.int64)
  group = np.arange(rows) // kernel.group_size
  perm = np.arange(rows) if kernel.perm is None else np.asarray(kernel.perm.get_value())
  original = np.empty_like(codes)
  original[perm] = codes
  g_idx = np.empty(rows, np.int32)
  g_idx[perm] = group
  zeros = np.rint(np.asarray(kernel.zeros.get_value(), np.float64)).astype(np.int64)
  stored_zeros = zeros - 1 if fmt == "gptq" else zeros
  return {"qweight": pack_along(original, kernel.bits, 0), "qzeros": pack_along(stored_zeros & (2 ** kernel.bits - 1),
                                                                                 kernel.bits, 1),
          "scales": np.asarray(kernel.scales.get_value(), np.float16), "g_idx": g_idx}


def choose_format(kernels) -> str:
  """"gptq" (v1, what most loaders expect) unless a zero point is 0, which v1 (zero - 1) cannot store."""
  if any(float(np.min(np.asarray(k.zeros.get_value(), np.float64))) < 1 for k in kernels):
    logger.warning("save_hf: a zero point is 0, which gptq v1 cannot store (it keeps zero - 1); writing "
                   "checkpoint_format 'gptq_v2'")
    return "gptq_v2"
  return "gptq"


def from_tensors(t: dict[str, np.ndarray], *, rows: int, out: int, cfg: dict, prefix: str, axes,
                 implementation=None) -> GroupQuantizedKernel:
  """A GroupQuantizedKernel from one linear's tensors; GPTQFormatError naming the tensor on any disagreement."""
  bits = cfg["bits"]
  pack = 32 // bits
  gs = rows if cfg["group_size"] == -1 else cfg["group_size"]
  groups = -(-rows // gs)  # g_idx = row // group_size: a short last group when it does not divide
  want = {"qweight": (rows // pack, out), "qzeros": (groups, out // pack), "scales": (groups, out), "g_idx": (rows,)}
  for name, shape in want.items():
    got = tuple(t[name].shape)
    if got != shape:
      raise GPTQFormatError(f"{prefix}.{name} has shape {got}, but bits={bits}, group_size={cfg['group_size']} and "
                            f"the layer's [in={rows}, out={out}] imply {shape}")
  for name in ("qweight", "qzeros"):
    if t[name].dtype != np.int32:
      raise GPTQFormatError(f"{prefix}.{name} must be int32, got {t[name].dtype}")
  codes = unpack_along(t["qweight"], bits, 0)
  zeros = unpack_along(t["qzeros"], bits, 1) + (1 if cfg["format"] == "gptq" else 0)
  g_idx = np.asarray(t["g_idx"], np.int64)
  if g_idx.min() < 0 or g_idx.max() >= groups:
    raise GPTQFormatError(f"{prefix}.g_idx: groups must lie in [0, {groups}), got [{g_idx.min()}, {g_idx.max()}]")
  counts = np.bincount(g_idx, minlength=groups)
  want_counts = np.minimum(gs, rows - gs * np.arange(groups))
  if np.any(counts != want_counts):
    raise GPTQFormatError(f"{prefix}.g_idx: every group must hold group_size={gs} rows (the last one the rest), "
                          f"got counts in [{counts.min()}, {counts.max()}]")
  perm = np.argsort(g_idx, kind="stable")
  identity = bool(np.all(perm == np.arange(rows)))
  scale_dtype = "float16" if t["scales"].dtype == np.float16 else "float32"
  return GroupQuantizedKernel(codes[perm], np.asarray(t["scales"], np.float32), zeros.astype(np.float32), bits=bits,
                              group_size=gs, method="gptq", axes=axes, perm=None if identity else perm,
                              scale_dtype=scale_dtype, implementation=implementation, sym=cfg["sym"])


def model_settings(kernels: dict[str, object]) -> tuple[int, int, bool, bool]:
  """(bits, group_size for config.json, sym, desc_act) shared by every quantized kernel; GPTQFormatError naming
  the first layer that cannot be written or disagrees."""
  settings = set()
  for path, k in kernels.items():
    if not isinstance(k, GroupQuantizedKernel):
      raise GPTQFormatError(f"save_hf: {path} is a {getattr(k, 'method', type(k).__name__)} weight; only group-wise "
                            "weight-only kernels (int8, rtn, gptq) have a GPTQ layout")
    if k.bits not in SUPPORTED_BITS:
      raise GPTQFormatError(f"save_hf: {path} has bits={k.bits}; the GPTQ layout is written for bits in "
                            f"{SUPPORTED_BITS}")
    gs = -1 if k.group_size == k.shape[0] else k.group_size
    settings.add((k.bits, gs, k.sym))
  if len(settings) > 1:
    raise GPTQFormatError(f"save_hf: quantized layers disagree on (bits, group_size, sym): {sorted(settings)}; "
                          "one quantization_config covers them all")
  return (*settings.pop(), any(k.perm is not None for k in kernels.values()))
