"""Medusa-1: train K decoding heads on the frozen quickstart model (Cai et al. 2024, sec. 2.2.1), on a CPU.

  jaxinfer train --config experiments/quickstart.py     # the base, once: results/quickstart/hf
  jaxinfer train --config experiments/medusa.py         # -> results/quickstart/hf/medusa_heads.safetensors
  jaxinfer train --config experiments/medusa.py --config.medusa.base_dir=/tmp/w3_quickstart/hf \
      --config.workdir=/tmp/w3_medusa                   # a base trained elsewhere

Trains 4 heads (one residual block each, every head initialised as a copy of the base's lm_head) on the base's
final hidden states: head k predicts the token k + 2 places ahead, loss sum_k 0.8^k L_k; the base gets no
gradient and no optimizer state. The data section is the quickstart's (same stdlib files, tokenized with the
base's own tokenizer.json, same held-out documents), so the held-out accuracies are on documents neither the
base nor the heads trained on. Writes checkpoints, metrics.jsonl, loss_curve.png, head_accuracy.png and
results.md (per-head held-out top-1 / top-3 accuracy, beside the untrained heads, the base's own next-token
accuracy and a unigram baseline) to the workdir, and medusa_heads.safetensors + medusa_config.json beside the
base (medusa.output_dir to put them elsewhere). Running the same command again resumes.
"""

from jaxinfer.config import data_section, mesh_section, train_section
from jaxinfer.train.config import training_config
from jaxinfer.train.medusa import medusa_section


def get_config():
  medusa = medusa_section(base_dir="results/quickstart/hf", num_heads=4, num_layers=1, decay_coefficient=0.8)
  data = data_section(max_bytes=3_000_000, eval_fraction=0.03)  # the quickstart's: its held-out documents
  # 75 steps x 16 rows x 256 tokens: 408 s of CPU (user + sys) on the 2-core machine; head 0 is at 12% top-1
  # after 25 steps and gains little after 75 (13.2% at 75, 13.3% at 100 steps)
  train = train_section(objective="medusa", steps=75, batch_size=16, seq_len=256, grad_accum=2,
                        learning_rate=3e-3, warmup_steps=10, min_lr_ratio=0.1, weight_decay=0.0,
                        eval_every=25, eval_batches=8, checkpoint_every=25, keep_checkpoints=2, sample_prompts=())
  config = training_config("medusa", "results/medusa", None, train, data=data, mesh=mesh_section(data=-1),
                           medusa=medusa)
  config.driver = "medusa"  # `jaxinfer run` runs it too (jaxinfer/experiments/medusa.py)
  return config
