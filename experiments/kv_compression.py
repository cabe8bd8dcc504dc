"""KV-cache eviction policies (StreamingLLM, window only, SnapKV, H2O, Duo head budgets) on each KV dtype
(float, bfloat16, int8, float8_e4m3fn) on a model trained by the quickstart recipe at a 1K context.
Driver: jaxinfer/experiments/kv_compression.py (what each part measures); results in docs/kv_compression.md.

  jaxinfer train --config experiments/quickstart.py --config.workdir=results/kv_model \
      --config.train.seq_len=1024 --config.train.batch_size=4 --config.train.steps=420 \
      --config.train.warmup_steps=10                                                      # once
  jaxinfer run --config experiments/kv_compression.py
  jaxinfer run --config experiments/kv_compression.py "--config.kv_compression.parts=('engine',)"

Writes results/kv_compression/<run_name>/ (resolved_config.json, metrics.jsonl, results.md, kv_compression.png).
"""

from jaxinfer.config import to_section
from jaxinfer.experiments.kv_compression import KVCompressionConfig
from jaxinfer.experiments.sections import experiment


def get_config():
  kv = to_section(KVCompressionConfig, checkpoint="results/kv_model/hf")
  return experiment("kv_compression", driver="kv_compression", seed=0, kv_compression=kv)
