"""Weight quantization on the quickstart-trained model: float32, bf16, int8 (W8A16), LLM.int8(), int4 RTN /
GPTQ (g128, with and without act-order), 3-bit RTN / GPTQ. Driver: jaxinfer/experiments/quantization.py.

  jaxinfer train --config experiments/quickstart.py                  # once: writes results/quickstart/hf
  jaxinfer run --config experiments/quantization.py
  jaxinfer run --config experiments/quantization.py --config.quantization.checkpoint=/tmp/qs/hf

Writes results/quantization/<run_name>/ (resolved_config.json, metrics.jsonl, results.md, quantization.png).
"""

from jaxinfer.config import data_section, to_section
from jaxinfer.experiments.quantization import QuantizationExperimentConfig
from jaxinfer.experiments.sections import experiment


def get_config():
  # the quickstart's data settings (experiments/quickstart.py), so the held-out rows are the documents its
  # training held out; the tokenizer is the checkpoint's own
  data = data_section(max_bytes=3_000_000, eval_fraction=0.03)
  quantization = to_section(QuantizationExperimentConfig, checkpoint="results/quickstart/hf")
  return experiment("quantization", driver="quantization", seed=0, data=data, quantization=quantization)
