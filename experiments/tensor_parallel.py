"""Megatron tensor parallelism for inference: collectives per decode step and per-device memory vs the tensor
size, beside Megatron-LM's analysis. Driver: jaxinfer/experiments/tensor_parallel.py.

  jaxinfer run --config experiments/tensor_parallel.py [--config.tp.tensors="(1, 2, 4, 8)"]

Writes results/tensor_parallel/<run_name>/ (resolved_config.json, metrics.jsonl, results.md, tensor_parallel.png).
"""

from jaxinfer.config import to_section
from jaxinfer.experiments.sections import experiment
from jaxinfer.experiments.tensor_parallel import TensorParallelConfig


def get_config():
  tp = to_section(TensorParallelConfig, tensors=(1, 2, 4, 8), host_devices=8, num_layers=4, hidden_size=256,
                  intermediate_size=1024, num_heads=8, num_kv_heads=8, vocab_size=1024, batch=8, page_size=16,
                  pages_per_seq=8, repeats=5)
  return experiment("tensor_parallel", driver="tensor_parallel", tp=tp)
