"""Prometheus metrics of the server, named as vLLM's with a `jaxinfer:` prefix, in a registry of its own.

  jaxinfer:num_requests_running / num_requests_waiting   gauges (the engine's running and waiting requests)
  jaxinfer:kv_cache_usage_perc                           gauge, fraction of KV pages in use (1 = full)
  jaxinfer:prefix_cache_queries / prefix_cache_hits      counters: admissions looked up / that reused pages
  jaxinfer:prefix_cache_hit_tokens                       counter: prompt tokens not recomputed
  jaxinfer:num_preemptions                               counter
  jaxinfer:prompt_tokens / generation_tokens             counters
  jaxinfer:request_success                               counter by finished_reason (stop, length, abort)
  jaxinfer:time_to_first_token_seconds                   histogram: request arrival -> first token out
  jaxinfer:inter_token_latency_seconds                   histogram: between consecutive tokens of a request
  jaxinfer:e2e_request_latency_seconds                   histogram: arrival -> last token

Engine-side values come from the bridge's latest snapshot (taken on the engine thread after each step) when
/metrics is scraped; the histograms are observed by the bridge as tokens are handed to the requests.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

PREFIX = "jaxinfer:"
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
                40.0, 80.0)
ITL_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0)
E2E_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0,
               480.0, 960.0)


class _EngineCollector:
  """Reads the bridge's snapshot at scrape time."""

  def __init__(self, snapshot, model_name: str):
    self.snapshot, self.model = snapshot, model_name

  def collect(self):
    s = self.snapshot()
    labels = ["model_name"]
    for name, doc, key in (("num_requests_running", "Requests running in the engine (holding KV pages).", "running"),
                           ("num_requests_waiting", "Requests waiting for admission.", "waiting"),
                           ("kv_cache_usage_perc", "Fraction of KV-cache pages in use (1 means 100 percent).",
                            "kv_usage")):
      g = GaugeMetricFamily(PREFIX + name, doc, labels=labels)
      g.add_metric([self.model], float(s.get(key, 0)))
      yield g
    for name, doc, key in (("prefix_cache_queries", "Admissions looked up in the prefix cache.", "prefix_queries"),
                           ("prefix_cache_hits", "Admissions that reused cached pages.", "prefix_hits"),
                           ("prefix_cache_hit_tokens", "Prompt tokens reused from the prefix cache.",
                            "prefix_hit_tokens"),
                           ("num_preemptions", "Requests preempted (recomputed later).", "preemptions")):
      c = CounterMetricFamily(PREFIX + name, doc, labels=labels)
      c.add_metric([self.model], float(s.get(key, 0)))
      yield c


class ServerMetrics:
  def __init__(self, model_name: str, snapshot=lambda: {}):
    self.model = model_name
    self.registry = CollectorRegistry()
    r, labels = self.registry, ["model_name"]
    self.ttft = Histogram(PREFIX + "time_to_first_token_seconds", "Time to first token.", labels,
                          buckets=TTFT_BUCKETS, registry=r).labels(model_name)
    self.itl = Histogram(PREFIX + "inter_token_latency_seconds", "Time between consecutive output tokens.", labels,
                         buckets=ITL_BUCKETS, registry=r).labels(model_name)
    self.e2e = Histogram(PREFIX + "e2e_request_latency_seconds", "Arrival to last token.", labels,
                         buckets=E2E_BUCKETS, registry=r).labels(model_name)
    self.prompt_tokens = Counter(PREFIX + "prompt_tokens", "Prompt tokens of finished requests.", labels,
                                 registry=r).labels(model_name)
    self.generation_tokens = Counter(PREFIX + "generation_tokens", "Tokens generated.", labels,
                                     registry=r).labels(model_name)
    self._success = Counter(PREFIX + "request_success", "Finished requests by reason.",
                            labels + ["finished_reason"], registry=r)
    r.register(_EngineCollector(snapshot, model_name))

  def finished(self, reason: str, prompt_tokens: int) -> None:
    self._success.labels(self.model, reason).inc()
    self.prompt_tokens.inc(prompt_tokens)

  def exposition(self) -> bytes:
    return generate_latest(self.registry)
