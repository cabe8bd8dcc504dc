"""Driver: static batching vs continuous batching vs continuous batching + chunked prefill (jaxinfer.Engine).

Config: experiments/serving.py (sections `model` and `serving`, ServingExperimentConfig below).

A synthetic workload (Poisson arrivals; heavy-tailed, Pareto-distributed prompt and output lengths) is served
on a small randomly initialised model three ways (the arrival rate is `load` x a capacity estimate measured on
this machine first, see `calibrate`, unless `arrival_rate` is set):
  static      a batch of up to max_batch_size queued requests is admitted only when the previous batch has
              fully finished, and runs in lockstep like a fixed-shape batch: a request that is done keeps its
              slot (its extra tokens are computed and dropped) until the longest one ends; prompts prefilled
              whole;
  continuous  iteration-level scheduling: a request joins the running batch as soon as it arrives and leaves
              it as soon as it finishes (prompts prefilled whole, beside the decodes);
  chunked     continuous + chunked prefill: each step runs every decode first and fills the rest of a
              `chunk_budget`-token budget with prompt chunks (Sarathi-Serve).

Time is a simulated clock: arrivals are drawn in seconds on it; every engine.step() is timed with the wall
clock (it blocks on the sampled tokens) and advances the clock by that duration minus the compilation of new
step programs (Engine(separate_compile=True) compiles a new bucket in an empty step first, timed apart); an
idle engine jumps to the next arrival. A token's time is the clock at the end of the step that produced it.
TTFT = first token - arrival; TPOT of a request = (last token - first token) / (tokens - 1); ITL = time
between consecutive tokens of a request; throughput = generated tokens / (last finish - first arrival).
"""

from __future__ import annotations

import dataclasses
import time

import numpy as np

from jaxinfer.experiments import results
from jaxinfer.experiments.sections import check, read
from jaxinfer.experiments.timing import ratios, time_call

MODES = ("static", "continuous", "chunked")


@dataclasses.dataclass(frozen=True)
class ServingExperimentConfig:
  SECTION = "serving"
  # the workload
  num_requests: int = 128
  # requests per second of the simulated clock (Poisson). None: `load` x the capacity estimated right before
  # the runs, so the regime (default: overloaded) does not depend on how fast or busy the machine is
  arrival_rate: float | None = None
  load: float = 2.0
  prompt_min: int = 16  # Pareto lengths: min * (1 + Lomax(alpha)), clipped to max
  prompt_alpha: float = 1.2
  prompt_max: int = 384
  output_min: int = 8
  output_alpha: float = 1.1
  output_max: int = 128
  # the engine (the modes set chunked_prefill and max_step_tokens)
  max_batch_size: int = 32
  page_size: int = 16
  num_pages: int | None = None  # None: room for max_batch_size full sequences
  max_model_len: int = 512
  chunk_budget: int = 128  # max_step_tokens of the chunked run
  min_token_bucket: int = 16
  min_seq_bucket: int = 8
  modes: tuple[str, ...] = MODES
  calibration_steps: int = 12  # decode steps timed (median) for the capacity estimate

  def __post_init__(self):
    cls = type(self)
    check(cls, "modes", bool(self.modes) and set(self.modes) <= set(MODES), f"choose from {MODES}, got {self.modes}")
    check(cls, "prompt_max", self.prompt_max + self.output_max <= self.max_model_len,
          f"prompt_max + output_max = {self.prompt_max + self.output_max} exceeds max_model_len={self.max_model_len}")
    check(cls, "chunk_budget", self.chunk_budget >= self.max_batch_size,
          f"{self.chunk_budget} must be >= max_batch_size={self.max_batch_size}")
    check(cls, "arrival_rate", self.arrival_rate is None or self.arrival_rate > 0,
          f"must be > 0, got {self.arrival_rate}")
    check(cls, "load", self.load > 0, f"must be > 0, got {self.load}")
    check(cls, "num_requests", self.num_requests >= 1, f"must be >= 1, got {self.num_requests}")
    check(cls, "prompt_min", 1 <= self.prompt_min <= self.prompt_max, "need 1 <= prompt_min <= prompt_max")
    check(cls, "output_min", 1 <= self.output_min <= self.output_max, "need 1 <= output_min <= output_max")
    check(cls, "calibration_steps", self.calibration_steps >= 1, f"must be >= 1, got {self.calibration_steps}")


SMOKE_MODEL = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_layers=1, num_heads=4, num_kv_heads=2,
                   max_position_embeddings=128)
SMOKE = dict(num_requests=8, prompt_min=4, prompt_max=12, output_min=2, output_max=8, max_batch_size=4,
             max_model_len=32, chunk_budget=16, min_token_bucket=16, min_seq_bucket=4, calibration_steps=3)


# ------------------------------------------------------------------------------------------------ workload


def workload(s: ServingExperimentConfig, vocab: int, seed: int, arrival_rate: float):
  """[(arrival seconds, prompt ids, output length)] sorted by arrival. The draws do not depend on the rate:
  the arrival gaps are unit exponentials scaled by 1 / arrival_rate."""
  rng = np.random.default_rng(seed)

  def pareto(lo, alpha, hi):
    return np.minimum(hi, np.floor(lo * (1.0 + rng.pareto(alpha, size=s.num_requests)))).astype(int)

  prompt_lens = pareto(s.prompt_min, s.prompt_alpha, s.prompt_max)
  output_lens = pareto(s.output_min, s.output_alpha, s.output_max)
  gaps = rng.exponential(1.0, size=s.num_requests)
  arrivals = np.cumsum(gaps) - gaps[0]
  return [(float(t / arrival_rate), rng.integers(0, vocab, size=int(p)).tolist(), int(o))
          for t, p, o in zip(arrivals, prompt_lens, output_lens)]


def engine_kwargs(s: ServingExperimentConfig, mode: str) -> dict:
  common = dict(max_batch_size=s.max_batch_size, page_size=s.page_size, num_pages=s.num_pages,
                max_model_len=s.max_model_len, min_token_bucket=s.min_token_bucket, min_seq_bucket=s.min_seq_bucket,
                max_queue=max(s.num_requests, s.max_batch_size), separate_compile=True)
  if mode == "chunked":
    return dict(common, chunked_prefill=True, max_step_tokens=s.chunk_budget)
  # whole prompts: the budget must hold a full-length prompt beside a full batch of decodes
  return dict(common, chunked_prefill=False, max_step_tokens=s.max_model_len + s.max_batch_size - 1)


def make_engine(model, s: ServingExperimentConfig, mode: str):
  from jaxinfer.engine import Engine

  return Engine(model, **engine_kwargs(s, mode))


def calibrate(model, s: ServingExperimentConfig, seed: int, mean_tokens: float) -> tuple[float, float]:
  """(decode step seconds, requests/s the continuous engine can take): a full batch of decodes (context ~64)
  is timed (median) and a request is taken to cost its mean prompt + output tokens at that rate."""
  engine = make_engine(model, s, "continuous")
  rng = np.random.default_rng(seed + 1)
  prompt = min(48, s.prompt_max)
  new = min(40, s.max_model_len - prompt - 1)
  for _ in range(s.max_batch_size):
    engine.add_request(rng.integers(0, model.config.vocab_size, size=prompt).tolist(), max_new_tokens=new)
  while engine.num_waiting or any(r.num_pending > 1 for r in engine.scheduler.running):
    engine.step()
  steps = min(s.calibration_steps, new - 2)
  step = time_call(engine.step, warmup=1, repeats=max(1, steps)).median  # the warm-up compiles the decode bucket
  return step, s.max_batch_size / step / mean_tokens


def serve(engine, requests, mode: str):
  """Drives the engine through the workload on the simulated clock; returns per-request records, gaps, trace."""
  n = len(requests)
  rec = [dict(arrival=t, prompt_len=len(p), output_len=o, tokens=[]) for t, p, o in requests]
  id_to_index = {}
  now, next_arrival, finished = 0.0, 0, 0
  held = []  # arrived, not yet handed to the engine (static: waiting for the current batch to drain)
  step_times, step_seqs = [], []
  while finished < n:
    while next_arrival < n and requests[next_arrival][0] <= now:
      held.append(next_arrival)
      next_arrival += 1
    if mode != "static":
      take = held
    else:
      take = held[:engine.max_batch_size] if not engine.has_unfinished() else []
    # static batching runs a batch in lockstep: every request keeps its slot until the longest is done
    lockstep = max((requests[i][2] for i in take), default=0)
    for i in take:
      _, prompt, out_len = requests[i]
      id_to_index[engine.add_request(prompt, max_new_tokens=lockstep if mode == "static" else out_len)] = i
    held = held[len(take):]
    if not engine.has_unfinished():
      now = max(now, requests[next_arrival][0])  # idle: jump to the next arrival
      continue
    start, compiling = time.perf_counter(), engine.stats["compile_seconds"]
    outs = engine.step()
    now += time.perf_counter() - start - (engine.stats["compile_seconds"] - compiling)
    step_times.append(now)
    step_seqs.append(engine.num_running)
    for out in outs:
      r = rec[id_to_index[out.request_id]]
      keep = max(0, min(len(out.new_token_ids), r["output_len"] - len(r["tokens"])))
      r["tokens"].extend([now] * keep)
      finished += bool(out.finished)
  for r in rec:
    assert len(r["tokens"]) == r["output_len"], "a request did not produce its tokens"
    r["ttft"] = r["tokens"][0] - r["arrival"]
    r["tpot"] = (r["tokens"][-1] - r["tokens"][0]) / (len(r["tokens"]) - 1) if len(r["tokens"]) > 1 else None
    r["finish"] = r["tokens"][-1]
  gaps = [np.diff(r["tokens"]) for r in rec if len(r["tokens"]) > 1]
  return rec, np.concatenate(gaps) if gaps else np.zeros(1), dict(step_end=step_times, running=step_seqs)


def summarize(mode: str, rec, gaps, engine) -> dict:
  total = sum(r["output_len"] for r in rec)
  span = max(r["finish"] for r in rec) - min(r["arrival"] for r in rec)
  ttft = np.array([r["ttft"] for r in rec])
  tpot = np.array([r["tpot"] for r in rec if r["tpot"] is not None] or [0.0])
  ms = lambda x: float(x) * 1e3  # noqa: E731
  return dict(mode=mode, requests=len(rec), output_tokens=int(total), makespan_s=float(span),
              throughput_tok_s=float(total / span), ttft_p50_ms=ms(np.percentile(ttft, 50)),
              ttft_p99_ms=ms(np.percentile(ttft, 99)), tpot_p50_ms=ms(np.percentile(tpot, 50)),
              tpot_p99_ms=ms(np.percentile(tpot, 99)), itl_p99_ms=ms(np.percentile(gaps, 99)),
              steps=engine.stats["steps"], preemptions=engine.stats["preemptions"],
              compilations_during_run=engine.compilations)


COLUMNS = (("mode", "mode", None), ("throughput (tok/s)", "throughput_tok_s", ".0f"),
           ("vs static", "vs_baseline", "{:.2f}x"), ("TTFT p50 (ms)", "ttft_p50_ms", ".0f"),
           ("TTFT p99 (ms)", "ttft_p99_ms", ".0f"), ("TPOT p50 (ms)", "tpot_p50_ms", ".1f"),
           ("TPOT p99 (ms)", "tpot_p99_ms", ".1f"), ("ITL p99 (ms)", "itl_p99_ms", ".1f"), ("steps", "steps", None),
           ("preemptions", "preemptions", None))


def table(rows: list[dict]) -> str:
  return results.table_from(rows, COLUMNS)


def add_ratios(rows: list[dict]) -> None:
  """`vs_baseline`: throughput / the static run's (the first mode when static is not run)."""
  base = "static" if any(r["mode"] == "static" for r in rows) else rows[0]["mode"]
  for mode, ratio in ratios({r["mode"]: r["throughput_tok_s"] for r in rows}, base).items():
    next(r for r in rows if r["mode"] == mode)["vs_baseline"] = ratio


# ------------------------------------------------------------------------------------------------ plots


def plot(rows, records, traces):
  plt = results.pyplot()
  modes = [r["mode"] for r in rows]
  colors = dict(zip(MODES, ["tab:gray", "tab:blue", "tab:green"]))
  fig, axes = plt.subplots(1, 4, figsize=(22, 4.5))
  axes[0].bar(modes, [r["throughput_tok_s"] for r in rows], color=[colors[m] for m in modes])
  axes[0].set(ylabel="output tokens / s", title="throughput")
  for ax, key, title in ((axes[1], "ttft", "time to first token (ms)"),
                         (axes[2], "tpot", "time per output token (ms)")):
    x = np.arange(len(modes))
    ax.bar(x - 0.2, [r[f"{key}_p50_ms"] for r in rows], 0.4, label="p50", color=[colors[m] for m in modes])
    ax.bar(x + 0.2, [r[f"{key}_p99_ms"] for r in rows], 0.4, label="p99", color=[colors[m] for m in modes],
           alpha=0.5, hatch="//")
    ax.set_xticks(x, modes)
    if key == "ttft":
      ax.set_yscale("log")
    ax.set_title(title + ": p50 solid, p99 hatched")
  ax = axes[3]
  for mode in modes:
    tpot = np.sort([r["tpot"] * 1e3 for r in records[mode] if r["tpot"] is not None])
    ax.plot(tpot, np.arange(1, len(tpot) + 1) / max(1, len(tpot)), label=mode, color=colors[mode])
  ax.set_xscale("log")
  ax.set(xlabel="TPOT per request (ms)", ylabel="fraction of requests", title="TPOT CDF")
  ax.legend()

  occupancy, ax = plt.subplots(figsize=(10, 3.5))
  for mode in modes:
    ax.step(traces[mode]["step_end"], traces[mode]["running"], where="post", label=mode, color=colors[mode],
            linewidth=0.8)
  ax.set(xlabel="simulated time (s)", ylabel="running requests", title="batch occupancy")
  ax.legend()
  return fig, occupancy


# ------------------------------------------------------------------------------------------------ run


def _describe(s, cfg, requests, calibration) -> str:
  p = np.array([len(x[1]) for x in requests])
  o = np.array([x[2] for x in requests])
  return (f"Model: {cfg.num_layers} layers, hidden {cfg.hidden_size}, vocab {cfg.vocab_size}, float32, random "
          f"weights. Workload: {len(requests)} requests, Poisson arrivals, {calibration}; prompt tokens Pareto(min "
          f"{s.prompt_min}, alpha {s.prompt_alpha}, max {s.prompt_max}): p50 {np.median(p):.0f}, p99 "
          f"{np.percentile(p, 99):.0f}; output tokens Pareto(min {s.output_min}, alpha {s.output_alpha}, max "
          f"{s.output_max}): p50 {np.median(o):.0f}, p99 {np.percentile(o, 99):.0f}. Engine: max_batch_size "
          f"{s.max_batch_size}, page_size {s.page_size}; static and continuous prefill whole prompts; chunked uses a "
          f"{s.chunk_budget}-token step budget.")


METHOD = ("Time: simulated clock advanced by the measured wall time of each engine.step() minus the compilation of "
          "new step programs (Engine(separate_compile=True) compiles a new bucket in an empty step first, timed "
          "apart); arrivals on the same clock. TPOT = per-request mean time between its tokens; ITL = time between "
          "consecutive tokens of a request. vs static = throughput / static batching's, measured in the same run.")


def run(config) -> list[dict]:
  import logging

  from jaxinfer.models.config import ModelConfig
  from jaxinfer.models.transformer import init_model

  s = read(config, ServingExperimentConfig, SMOKE)
  cfg = read(config, ModelConfig, SMOKE_MODEL)
  check("model", "max_position_embeddings", s.max_model_len <= cfg.max_position_embeddings,
        f"{cfg.max_position_embeddings} is below serving.max_model_len={s.max_model_len}")
  logging.getLogger("jaxinfer.engine").setLevel(logging.WARNING)
  model = init_model(cfg, seed=config.seed)
  mean_tokens = float(np.mean([len(p) + o for _, p, o in workload(s, cfg.vocab_size, config.seed, 1.0)]))
  with results.open_run(config) as out:
    if s.arrival_rate is None:
      step, capacity = calibrate(model, s, config.seed, mean_tokens)
      rate = s.load * capacity
      calibration = (f"arrival rate {rate:.1f}/s = load {s.load} x estimated capacity {capacity:.1f} requests/s (a "
                     f"{s.max_batch_size}-sequence decode step took {step * 1e3:.1f} ms; {mean_tokens:.0f} prompt + "
                     "output tokens per request)")
      out.log("calibration", decode_step_s=step, capacity_req_s=capacity, arrival_rate=rate, load=s.load)
    else:
      rate, calibration = s.arrival_rate, f"arrival rate {s.arrival_rate}/s (set)"
    print(calibration, flush=True)
    requests = workload(s, cfg.vocab_size, config.seed, rate)
    rows, records, traces = [], {}, {}
    for mode in s.modes:
      engine = make_engine(model, s, mode)
      t0 = time.perf_counter()
      rec, gaps, traces[mode] = serve(engine, requests, mode)
      rows.append(summarize(mode, rec, gaps, engine))
      records[mode] = rec
      print(f"{mode}: {rows[-1]['throughput_tok_s']:.0f} tok/s, TTFT p99 {rows[-1]['ttft_p99_ms']:.0f} ms, TPOT p99 "
            f"{rows[-1]['tpot_p99_ms']:.1f} ms ({time.perf_counter() - t0:.1f}s wall, {engine.compilations} programs "
            f"compiled in {engine.stats['compile_seconds']:.1f}s)", flush=True)
    add_ratios(rows)
    for row in rows:
      out.log("serving", **row)
    out.section("Static vs continuous batching vs chunked prefill", _describe(s, cfg, requests, calibration), METHOD,
                table(rows))
    throughput, occupancy = plot(rows, records, traces)
    out.figure(throughput, "serving.png", dpi=110)
    out.figure(occupancy, "serving_occupancy.png", dpi=110)
    print(out.markdown)
  return rows
