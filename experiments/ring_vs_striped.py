"""Ring attention vs Striped Attention (Brandon et al. 2023) vs zigzag: causal load balance (tile counts) and
per-device memory. Driver: jaxinfer/experiments/ring_vs_striped.py.

  jaxinfer run --config experiments/ring_vs_striped.py [--config.memory.total_len=8192 --config.run_name=8k]

Writes results/ring_vs_striped/<run_name>/ (resolved_config.json, metrics.jsonl, results.md, ring_vs_striped.png).
"""

from jaxinfer.config import to_section
from jaxinfer.experiments.ring_vs_striped import LoadBalanceConfig, MemoryConfig
from jaxinfer.experiments.sections import experiment


def get_config():
  balance = to_section(LoadBalanceConfig, devices=(2, 4, 8), seq_lens=(4096, 8192, 16384, 32768, 65536),
                       layouts=("contiguous", "striped", "zigzag"), block_q=128, block_k=128, causal=True)
  memory = to_section(MemoryConfig, devices=(1, 2, 4, 8), host_devices=8, total_len=16384, batch=1, heads=8,
                      kv_heads=8, head_dim=64, dtype="bfloat16", implementation="xla", layout="striped")
  return experiment("ring_vs_striped", driver="ring_vs_striped", balance=balance, memory=memory)
