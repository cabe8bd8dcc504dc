"""Hydragen reproduction: shared-prefix decode attention in isolation and in the engine, plus prefix caching's
time to first token. Driver: jaxinfer/experiments/prefix_sharing.py (what each part measures).

  jaxinfer run --config experiments/prefix_sharing.py
  jaxinfer run --config experiments/prefix_sharing.py --config.ttft.enabled=False --config.attention.batch=64

Writes results/prefix_sharing/<run_name>/ (resolved_config.json, metrics.jsonl, results.md, throughput.png,
engine_throughput.png, ttft.png).
"""

from jaxinfer.config import model_section, to_section
from jaxinfer.experiments.prefix_sharing import AttentionPartConfig, EngineDecodePartConfig, TTFTPartConfig
from jaxinfer.experiments.sections import experiment

PREFIX_LENS = (1024, 2048, 4096, 8192, 16384)  # 1K-16K, as in the paper


def get_config():
  # the model the engine parts serve: random weights, small enough for CPU; 2 layers so that, as in long-context
  # serving, attention rather than the MLP dominates a decode step (max_position_embeddings: set per part)
  model = model_section(vocab_size=1024, hidden_size=256, intermediate_size=512, num_layers=2, num_heads=8,
                        num_kv_heads=2, initializer_range=0.2)
  attention = to_section(AttentionPartConfig, batch=32, q_heads=8, kv_heads=2, head_dim=64, suffix_len=64,
                         prefix_lens=PREFIX_LENS, dtype="float32", repeats=7, rounds=2)
  engine_decode = to_section(EngineDecodePartConfig, batch=32, page_size=16, suffix_len=15, warm_steps=3,
                             decode_steps=8, rounds=2, max_step_tokens=1024, prefix_lens=PREFIX_LENS)
  ttft = to_section(TTFTPartConfig, shared_lens=(1024, 2048, 4096), question_len=16, requests=6,
                    max_step_tokens=512, page_size=16, rounds=3)
  return experiment("prefix_sharing", driver="prefix_sharing", seed=0, model=model, attention=attention,
                    engine_decode=engine_decode, ttft=ttft)
