"""Quickstart: train a small Llama-family model on the Python standard library's source, on a CPU, in minutes.

  jaxinfer train --config experiments/quickstart.py
  jaxinfer train --config experiments/quickstart.py --config.train.steps=600 --config.workdir=results/qs-long

Trains a byte-level BPE tokenizer (4096 tokens) on a ~3 MB seeded sample of the stdlib's .py files, then a
4-layer, 256-wide model on 256-token packed rows; writes checkpoints, metrics.jsonl, loss_curve.png,
results.md and a Hugging Face export (workdir/hf, with tokenizer.json), and prints sampled continuations
of code prompts. Running the same command again resumes from the latest checkpoint.
"""

from jaxinfer.config import data_section, mesh_section, model_section, train_section
from jaxinfer.train.config import training_config


def get_config():
  model = model_section(vocab_size=4096, hidden_size=256, intermediate_size=688, num_layers=4, num_heads=4,
                        num_kv_heads=2, max_position_embeddings=1024, param_dtype="float32", dtype="bfloat16")
  data = data_section(max_bytes=3_000_000, eval_fraction=0.03)
  train = train_section(steps=180, batch_size=16, seq_len=256, learning_rate=3e-3, warmup_steps=20,
                        min_lr_ratio=0.1, weight_decay=0.1, eval_every=60, eval_batches=8,
                        checkpoint_every=100, keep_checkpoints=2,
                        sample_prompts=("def fibonacci(n):", "import os\n", "class Stack:\n    def __init__(self"),
                        sample_tokens=64, sample_temperature=0.6, sample_top_k=20)
  config = training_config("quickstart", "results/quickstart", model, train, data=data, mesh=mesh_section(data=-1))
  config.driver = "train"  # `jaxinfer run` runs it too (jaxinfer/experiments/train.py)
  return config
