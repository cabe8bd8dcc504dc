"""A tiny training run for tests and smoke checks: 20 steps in well under 30 s on 2 CPU cores.

  jaxinfer train --config experiments/tiny.py --config.workdir=/tmp/tiny
"""

from jaxinfer.config import data_section, mesh_section, model_section, train_section
from jaxinfer.train.config import training_config


def get_config():
  model = model_section(vocab_size=512, hidden_size=64, intermediate_size=176, num_layers=2, num_heads=4,
                        num_kv_heads=2, max_position_embeddings=256, param_dtype="float32", dtype="float32")
  data = data_section(max_bytes=300_000, eval_fraction=0.1)
  train = train_section(steps=20, batch_size=8, seq_len=64, learning_rate=1e-2, warmup_steps=4,
                        eval_every=10, eval_batches=2, checkpoint_every=10, keep_checkpoints=2,
                        sample_prompts=("def ",), sample_tokens=16, progress=False)
  config = training_config("tiny", "results/tiny", model, train, data=data, mesh=mesh_section(data=-1))
  config.driver = "train"  # `jaxinfer run` runs it too (jaxinfer/experiments/train.py)
  return config
