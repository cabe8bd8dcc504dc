"""Driver of `jaxinfer bench serve --config experiments/bench_serve.py`: load over HTTP against `jaxinfer serve`.

For each server variant (a name and `jaxinfer serve` overrides, e.g. chunked prefill on and off; or one
server already running at `base_url`) and each request rate (rate by rate, the variants in turn, every
server started and compiled first, so drift on a shared machine hits the variants alike): a workload of `num_prompts` prompts (token
windows of the Python standard library's source, tokenized by the server; lengths uniform in
[len * (1 - range_ratio), len * (1 + range_ratio)], or a JSONL file of {"prompt", "output_len"}) is sent at
Poisson arrivals (rate = inf: all at once; `max_concurrency` caps requests in flight) by the load generator
(jaxinfer/serve/loadgen.py), with greedy decoding and ignore_eos so every request produces exactly its
output length. Reported (jaxinfer/serve/bench_metrics.py, vLLM benchmark_serving's definitions): request and
output-token throughput, TTFT, TPOT, ITL and E2E latency (mean, p50, p90, p99) and goodput under the SLOs.
Writes <workdir>/<run_name>/ with the shared results writer: metrics.jsonl (one row per variant and rate),
results.md, latency_vs_rate.png, and each launched server's log.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import math
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np

from jaxinfer.config import path_field
from jaxinfer.experiments import results
from jaxinfer.experiments.sections import check, read
from jaxinfer.serve import bench_metrics
from jaxinfer.serve.loadgen import Prompt, run_load


@dataclasses.dataclass(frozen=True)
class BenchServeConfig:
  SECTION = "bench"
  base_url: str = ""  # a running server (http://host:port); empty: launch one server per variant
  serve_config: str = path_field("experiments/serve.py")  # launched servers: `jaxinfer serve --config` this
  checkpoint: str = path_field("")  # launched servers: --config.serve.checkpoint (empty: the server's default)
  # launched servers: "name=override override ..." (overrides of serve_config, space-separated)
  variants: tuple = ("default=",)
  model: str = ""  # empty: the one /v1/models lists
  rates: tuple = (1.0, 2.0, 4.0)  # requests per second (Poisson); inf: all at once
  max_concurrency: int = 0  # 0: no cap
  num_prompts: int = 32  # per rate
  dataset_file: str = path_field("")  # JSONL {"prompt": text or token ids, "output_len": n}; empty: synthetic
  input_len: int = 128
  output_len: int = 32
  range_ratio: float = 0.5
  corpus_chars: int = 200_000  # synthetic prompts are windows of this much standard-library source
  warmup_requests: int = 4  # sent one by one before the first rate (not measured)
  slo_ttft_ms: float = 0.0  # goodput SLOs; 0: not used
  slo_tpot_ms: float = 0.0
  slo_e2e_ms: float = 0.0
  seed: int = 0
  server_start_timeout_s: float = 1200.0

  def __post_init__(self):
    cls = type(self)
    check(cls, "rates", bool(self.rates) and all(float(r) > 0 for r in self.rates), f"need rates > 0, got "
          f"{self.rates}")
    check(cls, "num_prompts", self.num_prompts >= 1, f"must be >= 1, got {self.num_prompts}")
    check(cls, "input_len", self.input_len >= 1, f"must be >= 1, got {self.input_len}")
    check(cls, "output_len", self.output_len >= 1, f"must be >= 1, got {self.output_len}")
    check(cls, "range_ratio", 0 <= self.range_ratio < 1, f"must be in [0, 1), got {self.range_ratio}")
    check(cls, "max_concurrency", self.max_concurrency >= 0, f"must be >= 0, got {self.max_concurrency}")
    check(cls, "variants", self.base_url != "" or (bool(self.variants) and all("=" in v for v in self.variants)),
          f"each variant is 'name=overrides', got {self.variants}")
    if self.dataset_file:
      check(cls, "dataset_file", Path(self.dataset_file).is_file(), f"{self.dataset_file} does not exist")


SMOKE = dict(num_prompts=4, rates=(float("inf"), 50.0), input_len=8, output_len=4, warmup_requests=1,
             corpus_chars=5000)


# ------------------------------------------------------------------------------------------ HTTP helpers
def _get(url: str, timeout: float = 10.0):
  with urllib.request.urlopen(url, timeout=timeout) as r:
    return r.status, r.read()


def _post(url: str, body: dict, timeout: float = 120.0) -> dict:
  req = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
  with urllib.request.urlopen(req, timeout=timeout) as r:
    return json.loads(r.read())


def _model(base_url: str, cfg: BenchServeConfig) -> tuple[str, int]:
  data = json.loads(_get(base_url + "/v1/models")[1])["data"][0]
  return cfg.model or data["id"], int(data.get("max_model_len") or 1 << 30)


# ------------------------------------------------------------------------------------------ the workload
def _corpus(max_chars: int) -> str:
  """Text every machine has: the Python standard library's source, in a fixed order."""
  root = Path(os.__file__).parent
  parts, size = [], 0
  for f in sorted(root.glob("*.py")):
    text = f.read_text(errors="ignore")
    parts.append(text)
    size += len(text)
    if size >= max_chars:
      break
  return "".join(parts)[:max_chars]


def _lengths(rng, n: int, mean: int, ratio: float) -> np.ndarray:
  low, high = max(1, int(mean * (1 - ratio))), max(1, int(mean * (1 + ratio)))
  return rng.integers(low, high + 1, size=n)


def workload(base_url: str, model: str, cfg: BenchServeConfig, max_model_len: int) -> list[Prompt]:
  rng = np.random.default_rng(cfg.seed)
  if cfg.dataset_file:
    prompts = []
    for line in Path(cfg.dataset_file).read_text().splitlines():
      if line.strip():
        item = json.loads(line)
        p = item["prompt"]
        ids = p if isinstance(p, list) else _post(base_url + "/tokenize", {"model": model, "prompt": p})["tokens"]
        prompts.append(Prompt(tuple(ids), int(item.get("output_len", cfg.output_len))))
    return [prompts[i % len(prompts)] for i in range(cfg.num_prompts)]
  ids = _post(base_url + "/tokenize", {"model": model, "prompt": _corpus(cfg.corpus_chars),
                                           "add_special_tokens": False})["tokens"]
  ins = _lengths(rng, cfg.num_prompts, cfg.input_len, cfg.range_ratio)
  outs = _lengths(rng, cfg.num_prompts, cfg.output_len, cfg.range_ratio)
  prompts = []
  for n_in, n_out in zip(ins, outs):
    n_in = int(min(n_in, max_model_len - n_out - 1, len(ids) - 1))
    start = int(rng.integers(0, len(ids) - n_in))
    prompts.append(Prompt(tuple(ids[start:start + n_in]), int(n_out)))
  return prompts


# ------------------------------------------------------------------------------------------ servers
def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


class LaunchedServer:
  """`jaxinfer serve` in a subprocess (warm-up on: every step shape compiled before it listens); SIGTERM at
  the end (it drains, then exits)."""

  def __init__(self, cfg: BenchServeConfig, overrides: list[str], log_path: Path):
    self.port = _free_port()
    self.url = f"http://127.0.0.1:{self.port}"
    args = [sys.executable, "-m", "jaxinfer.cli", "serve", "--config", cfg.serve_config,
            f"--config.serve.port={self.port}", "--config.serve.warmup=True"]
    if cfg.checkpoint:
      args.append(f"--config.serve.checkpoint={cfg.checkpoint}")
    self.log = open(log_path, "w")
    self.proc = subprocess.Popen(args + overrides, stdout=self.log, stderr=subprocess.STDOUT)
    self.log_path = log_path

  def wait_ready(self, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
      if self.proc.poll() is not None:
        raise RuntimeError(f"jaxinfer serve exited with {self.proc.returncode}; see {self.log_path}")
      try:
        if _get(self.url + "/health", timeout=2)[0] == 200:
          return
      except OSError:
        pass
      time.sleep(0.5)
    raise RuntimeError(f"jaxinfer serve not ready after {timeout}s; see {self.log_path}")

  def stop(self) -> int:
    if self.proc.poll() is None:
      self.proc.send_signal(signal.SIGTERM)
      try:
        self.proc.wait(120)
      except subprocess.TimeoutExpired:
        self.proc.kill()
        self.proc.wait()
    self.log.close()
    return self.proc.returncode


# ------------------------------------------------------------------------------------------ the run
def prepare(base_url: str, cfg: BenchServeConfig) -> tuple[str, list[Prompt]]:
  """The model name and the workload (tokenized by this server), after the warm-up requests."""
  model, max_len = _model(base_url, cfg)
  prompts = workload(base_url, model, cfg, max_len)
  for p in prompts[:cfg.warmup_requests]:
    asyncio.run(run_load(base_url, model, [p], rate=math.inf))
  return model, prompts


def bench_rate(base_url: str, model: str, prompts, cfg: BenchServeConfig, k: int, variant: str, run) -> dict:
  rate = float(cfg.rates[k])
  records, duration = asyncio.run(run_load(base_url, model, prompts, rate, cfg.max_concurrency, seed=cfg.seed + k))
  summary = bench_metrics.summarize(records, duration, cfg.slo_ttft_ms, cfg.slo_tpot_ms, cfg.slo_e2e_ms)
  row = dict(variant=variant, rate=rate, max_concurrency=cfg.max_concurrency, **summary)
  run.log("rate", **row)
  print(f"bench serve: {variant} rate {rate}: {summary['request_throughput']:.2f} req/s, "
        f"{summary['output_throughput']:.1f} tok/s, TTFT p50 {summary['p50_ttft_ms']:.0f} ms, TPOT p99 "
        f"{summary['p99_tpot_ms']:.1f} ms, failed {summary['failed']}", flush=True)
  return row


COLUMNS = [("variant", "variant", None), ("rate (req/s)", "rate", ".2f"), ("done", "completed", None),
           ("req/s", "request_throughput", ".2f"), ("out tok/s", "output_throughput", ".1f"),
           ("TTFT mean", "mean_ttft_ms", ".0f"), ("TTFT p50", "p50_ttft_ms", ".0f"), ("TTFT p90", "p90_ttft_ms", ".0f"),
           ("TTFT p99", "p99_ttft_ms", ".0f"), ("TPOT mean", "mean_tpot_ms", ".1f"), ("TPOT p50", "p50_tpot_ms", ".1f"),
           ("TPOT p90", "p90_tpot_ms", ".1f"), ("TPOT p99", "p99_tpot_ms", ".1f"), ("ITL p50", "p50_itl_ms", ".1f"),
           ("ITL p99", "p99_itl_ms", ".1f"), ("E2E p50", "p50_e2e_ms", ".0f"), ("E2E p99", "p99_e2e_ms", ".0f"),
           ("goodput (req/s)", "goodput", ".2f")]


def plot(rows: list[dict], run) -> None:
  plt = results.pyplot()
  fig, axes = plt.subplots(1, 3, figsize=(14, 4))
  for ax, key, title in zip(axes, ("ttft", "tpot", "e2e"), ("TTFT", "TPOT", "E2E latency")):
    for variant in dict.fromkeys(r["variant"] for r in rows):
      rs = [r for r in rows if r["variant"] == variant]
      rates = [r["rate"] if math.isfinite(r["rate"]) else r["request_throughput"] for r in rs]
      for p, style in (("p50", "-o"), ("p99", "--s")):
        ax.plot(rates, [r[f"{p}_{key}_ms"] for r in rs], style, label=f"{variant} {p}")
    ax.set(xlabel="request rate (req/s)", ylabel="ms", title=title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
  run.figure(fig, "latency_vs_rate.png")


def run(config):
  cfg = read(config, BenchServeConfig, smoke=SMOKE)
  with results.open_run(config) as r:
    servers: dict[str, str] = {}  # variant -> base url
    launched: dict[str, LaunchedServer] = {}
    try:
      if cfg.base_url:
        servers["server"] = cfg.base_url.rstrip("/")
      for spec in ([] if cfg.base_url else cfg.variants):  # every server up (and compiled) before any load
        name, _, overrides = spec.partition("=")
        launched[name] = LaunchedServer(cfg, overrides.split(), r.dir / f"server_{name}.log")
        launched[name].wait_ready(cfg.server_start_timeout_s)
        servers[name] = launched[name].url
      prepared = {name: prepare(url, cfg) for name, url in servers.items()}
      # rate by rate, the variants in turn (idle servers cost nothing): drift on a shared machine hits all alike
      rows = [bench_rate(servers[name], *prepared[name], cfg, k, name, r)
              for k in range(len(cfg.rates)) for name in servers]
    finally:
      for name, server in launched.items():
        print(f"bench serve: server {name} exited with {server.stop()} after SIGTERM (drained)", flush=True)
    rows.sort(key=lambda row: list(servers).index(row["variant"]))
    r.section("Load over HTTP", f"{cfg.num_prompts} requests per rate; prompts ~{cfg.input_len} tokens, outputs "
              f"~{cfg.output_len} (range ratio {cfg.range_ratio}); greedy, ignore_eos. Latencies in ms.",
              results.table_from(rows, COLUMNS), bench_metrics.__doc__.strip().split("\n", 1)[1])
    plot(rows, r)
  return rows
