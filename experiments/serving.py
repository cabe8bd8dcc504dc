"""Serving: static batching vs continuous batching vs continuous batching + chunked prefill (jaxinfer.Engine),
on a Poisson workload with heavy-tailed prompt and output lengths. Driver: jaxinfer/experiments/serving.py.

  jaxinfer run --config experiments/serving.py                                        # overloaded (load 2.0)
  jaxinfer run --config experiments/serving.py --config.serving.load=0.8 --config.run_name=load0.8

Writes results/serving/<run_name>/ (resolved_config.json, metrics.jsonl, results.md, serving.png,
serving_occupancy.png).
"""

from jaxinfer.config import model_section, to_section
from jaxinfer.experiments.sections import experiment
from jaxinfer.experiments.serving import ServingExperimentConfig


def get_config():
  # small, float32, random weights (every request runs to its length). Wide and shallow (14M parameters) so
  # that, as on an accelerator, a decode step is bound by reading the weights and batching decodes is nearly
  # free, while prefill is compute bound.
  model = model_section(vocab_size=1024, hidden_size=768, intermediate_size=2048, num_layers=2, num_heads=12,
                        num_kv_heads=2, max_position_embeddings=1024)
  serving = to_section(ServingExperimentConfig, num_requests=128, load=2.0, prompt_min=16, prompt_alpha=1.2,
                       prompt_max=384, output_min=8, output_alpha=1.1, output_max=128, max_batch_size=32,
                       page_size=16, max_model_len=512, chunk_budget=128, min_token_bucket=16, min_seq_bucket=8)
  return experiment("serving", driver="serving", seed=0, model=model, serving=serving)
