"""The statistics of `jaxinfer bench serve`, with vLLM benchmark_serving's definitions:

  request throughput  completed requests / duration (first request sent -> last response done)
  output throughput   output tokens of completed requests / duration (tokens from the server's usage)
  TTFT                time to first token: request sent -> first streamed chunk with text
  TPOT                time per output token, per request, excluding the first: (E2E - TTFT) / (output tokens - 1),
                      over requests with more than one output token
  ITL                 inter-token latency: every gap between consecutive streamed chunks of a request, pooled
                      over requests
  E2E                 end-to-end latency: request sent -> last chunk
  goodput             completed requests meeting every SLO given (TTFT <= slo_ttft_ms, TPOT <= slo_tpot_ms,
                      E2E <= slo_e2e_ms) / duration
Each latency is reported as mean, median (p50), p90 and p99, in milliseconds.
"""

from __future__ import annotations

import numpy as np

PERCENTILES = (50, 90, 99)


def _stats(values_s, name: str) -> dict:
  v = np.asarray(values_s, dtype=np.float64) * 1000.0
  out = {f"mean_{name}_ms": float(v.mean()) if v.size else None}
  for p in PERCENTILES:
    out[f"p{p}_{name}_ms"] = float(np.percentile(v, p)) if v.size else None
  return out


def summarize(records, duration: float, slo_ttft_ms: float = 0.0, slo_tpot_ms: float = 0.0,
              slo_e2e_ms: float = 0.0) -> dict:
  ok = [r for r in records if r.success]
  tpots = [(r.latency - r.ttft) / (r.output_tokens - 1) for r in ok if r.output_tokens > 1]
  good = 0
  for r in ok:
    tpot = (r.latency - r.ttft) / (r.output_tokens - 1) if r.output_tokens > 1 else 0.0
    good += ((not slo_ttft_ms or r.ttft * 1000 <= slo_ttft_ms) and (not slo_tpot_ms or tpot * 1000 <= slo_tpot_ms)
             and (not slo_e2e_ms or r.latency * 1000 <= slo_e2e_ms))
  out_tokens = sum(r.output_tokens for r in ok)
  in_tokens = sum(r.prompt_len for r in ok)
  summary = {"completed": len(ok), "failed": len(records) - len(ok), "duration_s": duration,
             "total_input_tokens": in_tokens, "total_output_tokens": out_tokens,
             "request_throughput": len(ok) / duration, "output_throughput": out_tokens / duration,
             "total_token_throughput": (in_tokens + out_tokens) / duration,
             "goodput": good / duration if (slo_ttft_ms or slo_tpot_ms or slo_e2e_ms) else None}
  summary |= _stats([r.ttft for r in ok], "ttft")
  summary |= _stats(tpots, "tpot")
  summary |= _stats([g for r in ok for g in r.itl], "itl")
  summary |= _stats([r.latency for r in ok], "e2e")
  errors = [r.error for r in records if not r.success]
  summary["first_error"] = errors[0] if errors else ""
  return summary
