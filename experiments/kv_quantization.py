"""Quantized KV caches (int8 / float8_e4m3fn, dequantized inside the attention kernels) on the quickstart-trained
model: held-out perplexity and greedy agreement against the float32 cache, KV bytes per token, pages in a byte
budget and engine decode speed. Driver: jaxinfer/experiments/kv_quantization.py.

  jaxinfer train --config experiments/quickstart.py                  # once: writes results/quickstart/hf
  jaxinfer run --config experiments/kv_quantization.py
  jaxinfer run --config experiments/kv_quantization.py --config.kv_quantization.checkpoint=/tmp/qs/hf

Writes results/kv_quantization/<run_name>/ (resolved_config.json, metrics.jsonl, results.md, kv_quantization.png).
"""

from jaxinfer.config import data_section, to_section
from jaxinfer.experiments.kv_quantization import KVQuantExperimentConfig
from jaxinfer.experiments.sections import experiment


def get_config():
  # the quickstart's data settings (experiments/quickstart.py): the held-out rows are the documents its training
  # held out; the tokenizer is the checkpoint's own
  data = data_section(max_bytes=3_000_000, eval_fraction=0.03)
  kv = to_section(KVQuantExperimentConfig, checkpoint="results/quickstart/hf")
  return experiment("kv_quantization", driver="kv_quantization", seed=0, data=data, kv_quantization=kv)
