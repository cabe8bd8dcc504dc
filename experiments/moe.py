"""Dense vs Mixture-of-Experts at equal active parameters per token (8 experts, top-2), trained on the same
stdlib tokens and steps; expert load over training, tokens dropped vs capacity factor, all-to-all bytes vs the
expert-axis size. Driver: jaxinfer/experiments/moe.py.

  XLA_FLAGS=--xla_force_host_platform_device_count=8 jaxinfer run --config experiments/moe.py
  jaxinfer run --config experiments/moe.py --config.moe.steps=300 --config.run_name=long

Writes results/moe/<run_name>/ (metrics.jsonl, results.md, loss.png, expert_load.png,
capacity_and_all_to_all.png, and the two training workdirs dense/ and moe/).
"""

from jaxinfer.config import data_section, to_section
from jaxinfer.experiments.moe import MoEExperimentConfig
from jaxinfer.experiments.sections import experiment


def get_config():
  data = data_section(max_bytes=1_500_000, eval_fraction=0.05)
  return experiment("moe", driver="moe", seed=0, data=data, moe=to_section(MoEExperimentConfig))
