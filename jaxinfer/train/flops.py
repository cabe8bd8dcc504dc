"""Model FLOPs per token and the assumed peak FLOP/s of a device, for MFU.

Training FLOPs per token = 3 x forward (backward = 2 x forward) where the forward is
  2 x (parameters used in matmuls: attention projections, MLP, lm_head; the embedding lookup is free)
  + attention scores and values: 2 x 2 x seq x heads x head_dim per layer, halved for the causal mask.
Rematerialisation's recompute is not counted (this is MFU, not hardware FLOPs utilisation), and packed
documents are counted as if every token attended to the whole causal prefix of its row.
"""

from __future__ import annotations

import os

import jax

from jaxinfer.models.config import ModelConfig

# Dense bf16 peak FLOP/s per device (one chip / one GPU), from vendor spec sheets.
PEAK_FLOPS = (
    ("tpu v6", 918e12), ("tpu v5p", 459e12), ("tpu v5 lite", 197e12), ("tpu v5e", 197e12), ("tpu v5", 459e12),
    ("tpu v4", 275e12), ("tpu v3", 123e12), ("tpu v2", 45e12),
    ("gb200", 2450e12), ("b200", 2250e12), ("h200", 989e12), ("h100", 989e12), ("h800", 989e12),
    ("a100", 312e12), ("a800", 312e12), ("l40s", 362e12), ("l4", 121e12), ("a10g", 70e12), ("v100", 125e12),
)
CPU_GHZ, CPU_FLOPS_PER_CYCLE = 2.5, 32  # nominal: 2 FMA units x 8 fp32 lanes (AVX2/AVX-512 on 256-bit paths)


def _mlp_matmul_params(cfg: ModelConfig, layer: int) -> int:
  """Matmul parameters one token uses in a layer's MLP: an MoE layer counts its router, the top-k experts and
  the shared expert (with its gate), not all experts."""
  d = cfg.hidden_size
  if not cfg.is_moe_layer(layer):
    return 3 * d * cfg.intermediate_size
  shared = 3 * d * cfg.shared_expert_intermediate_size + d if cfg.shared_expert_intermediate_size else 0
  return d * cfg.num_experts + 3 * d * cfg.resolved_moe_intermediate_size * cfg.num_experts_per_tok + shared


def matmul_params(cfg: ModelConfig) -> int:
  d, hd = cfg.hidden_size, cfg.resolved_head_dim
  attn = d * hd * (2 * cfg.num_heads + 2 * cfg.num_kv_heads)
  mlp = sum(_mlp_matmul_params(cfg, i) for i in range(cfg.num_layers))
  return cfg.num_layers * attn + mlp + d * cfg.vocab_size  # lm_head (or the tied embedding used as one)


def train_flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
  attention = 2 * 2 * seq_len * cfg.num_heads * cfg.resolved_head_dim * cfg.num_layers / 2  # causal: half
  forward = 2 * matmul_params(cfg) + attention
  return 3.0 * forward


def peak_flops_per_device(device=None, override: float = 0.0) -> tuple[float, str]:
  """(peak FLOP/s assumed for one device, how it was obtained)."""
  device = device or jax.local_devices()[0]
  kind = str(getattr(device, "device_kind", device.platform)).lower()
  if override > 0:
    return float(override), f"train.peak_flops_per_device={override:.3g} (set in the config)"
  if device.platform == "cpu":
    cores = os.cpu_count() or 1
    per_device = cores * CPU_GHZ * 1e9 * CPU_FLOPS_PER_CYCLE / max(1, jax.local_device_count())
    return per_device, (f"CPU: no published peak; nominal {cores} cores x {CPU_GHZ} GHz x {CPU_FLOPS_PER_CYCLE} "
                        f"FP32 FLOP/cycle shared by {jax.local_device_count()} host device(s) = "
                        f"{per_device / 1e9:.1f} GFLOP/s per device (a rough assumption, not a measurement)")
  for name, peak in PEAK_FLOPS:
    if name in kind:
      return peak, f"{kind}: {peak / 1e12:.0f} TFLOP/s dense bf16 (vendor peak)"
  return 0.0, f"{kind}: unknown device kind, MFU not computed (set train.peak_flops_per_device)"
