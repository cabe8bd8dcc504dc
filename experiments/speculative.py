"""Speculative decoding in the engine: prompt lookup, a draft model (fixed and adaptive k) and Medusa-1 heads
(chains and candidate trees) beside plain decoding on a trained target, at batch 1 and 8. Driver:
jaxinfer/experiments/speculative.py.

  jaxinfer train --config experiments/quickstart.py                                  # the target (~4.5 min)
  jaxinfer train --config experiments/quickstart.py --config.model.hidden_size=128 --config.model.num_layers=2 \
      --config.model.intermediate_size=344 --config.workdir=results/speculative_draft  # the draft (same tokens)
  jaxinfer train --config experiments/medusa.py                     # Medusa heads beside results/quickstart/hf
  jaxinfer run --config experiments/speculative.py

Writes results/speculative/<run_name>/ (resolved_config.json, metrics.jsonl, results.md, tokens_per_step.png).
"""

from jaxinfer.config import model_section, to_section
from jaxinfer.experiments.sections import experiment
from jaxinfer.experiments.speculative import SpeculativeRunConfig


def get_config():
  model = model_section(vocab_size=128, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
                        num_kv_heads=2, max_position_embeddings=256, initializer_range=0.2)  # smoke only
  speculative = to_section(SpeculativeRunConfig, target="results/quickstart/hf", draft="results/speculative_draft/hf",
                           methods=("ngram", "draft", "medusa"), ks=(1, 2, 4, 6), adaptive=True,
                           medusa_heads="results/quickstart/hf",
                           trees=((1,), (1, 1), (1, 1, 1), (3,), (3, 2), (2, 2, 1)), batches=(1, 8),
                           prompt_tokens=96, max_new_tokens=32, temperature=0.0, rounds=2)
  return experiment("speculative", driver="speculative", seed=0, model=model, speculative=speculative)
