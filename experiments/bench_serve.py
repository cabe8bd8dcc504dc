"""`jaxinfer bench serve`: a load generator over HTTP against `jaxinfer serve` (docs/serving.md).

  jaxinfer bench serve --config experiments/bench_serve.py --config.bench.checkpoint=/tmp/qs/hf
  jaxinfer bench serve --config experiments/bench_serve.py --config.bench.base_url=http://127.0.0.1:8000

Launches one server per variant (chunked prefill on, and off), sends `num_prompts` requests at each rate,
writes results/bench_serve/<run_name>/ (metrics.jsonl, results.md, latency_vs_rate.png, server logs).
"""

from jaxinfer.config import to_section
from jaxinfer.experiments.bench_serve import BenchServeConfig
from jaxinfer.experiments.sections import experiment

ENGINE = "--config.engine.max_batch_size=16 --config.engine.min_seq_bucket=16 --config.engine.max_model_len=320"


def get_config():
  bench = to_section(
      BenchServeConfig, rates=(1.0, 3.0, 6.0), num_prompts=48, input_len=160, output_len=32, range_ratio=0.5,
      warmup_requests=2, slo_ttft_ms=2000.0, slo_tpot_ms=100.0,
      variants=(f"chunked={ENGINE} --config.engine.chunked_prefill=True --config.engine.max_step_tokens=64",
                f"whole={ENGINE} --config.engine.chunked_prefill=False --config.engine.max_step_tokens=336"))
  return experiment("bench_serve", driver="bench_serve", bench=bench)
