"""Serving: static batching vs continuous batching vs continuous batching + chunked prefill (jaxinfer.Engine).

A synthetic workload (Poisson arrivals; heavy-tailed, Pareto-distributed prompt and output lengths) is
served on a small randomly initialised model three ways (the arrival rate is set from a capacity estimate
measured on this machine first, see `load`):
  static      a batch of up to max_batch_size queued requests is admitted only when the previous batch has
              fully finished, and runs in lockstep like a fixed-shape batch: a request that is done keeps its
              slot (its extra tokens are computed and dropped) until the longest one ends; prompts prefilled
              whole;
  continuous  iteration-level scheduling: a request joins the running batch as soon as it arrives and a
              sequence leaves it as soon as it finishes (prompts prefilled whole, beside the decodes);
  chunked     continuous + chunked prefill: each step runs every decode first and fills the rest of a
              `chunk_budget`-token budget with prompt chunks (Sarathi-Serve), so no step is much longer
              than a decode step.

How time is measured: a simulated clock. Arrival times are drawn in seconds on that clock; every
engine.step() is timed with the wall clock (it blocks on the sampled tokens) and advances the clock by
that duration; when the engine has nothing to do the clock jumps to the next arrival (no sleeping). The
first step of a new (tokens, sequences) bucket compiles its program in a separate empty step first
(Engine(separate_compile=True)) and that time is taken out, so compilation is not counted. A token's
time is the clock at the end of the step that produced it. TTFT = first token - arrival; TPOT of a request
= (last token - first token) / (tokens - 1); throughput = generated tokens / (last finish - first arrival).

    python experiments/serving.py --out results/serving [--config.load=0.8 | --config.arrival_rate=10.0]
"""

from __future__ import annotations

import datetime
import json
import os
import sys
import time

import ml_collections

MODES = ("static", "continuous", "chunked")


def get_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.name = "serving"
  c.seed = 0
  # the model: small, float32, random weights (outputs are irrelevant: every request runs to its length).
  # Wide and shallow (14M parameters, 55 MB) so that, as on an accelerator, a decode step is bound by reading
  # the weights and batching decodes is nearly free, while prefill is compute bound.
  c.model = ml_collections.ConfigDict(dict(
      vocab_size=1024, hidden_size=768, intermediate_size=2048, num_layers=2, num_heads=12, num_kv_heads=2,
      max_position_embeddings=1024))
  # the workload
  c.num_requests = 128
  # requests per second of the simulated clock (Poisson). None: `load` x the capacity estimated on this
  # machine right before the runs (a full batch of decodes is timed; a request costs its prompt + output
  # tokens), so the regime (here: overloaded) does not depend on how fast or busy the machine is
  c.arrival_rate = ml_collections.config_dict.placeholder(float)
  c.load = 2.0  # above capacity: the queue builds up, so throughput measures what each mode can sustain
  c.prompt_min = 16  # Pareto lengths: min * (1 + Lomax(alpha)), clipped to max
  c.prompt_alpha = 1.2
  c.prompt_max = 384
  c.output_min = 8
  c.output_alpha = 1.1
  c.output_max = 128
  # the engine
  c.max_batch_size = 32
  c.page_size = 16
  c.num_pages = ml_collections.config_dict.placeholder(int)  # None: room for max_batch_size full sequences
  c.max_model_len = 512
  c.chunk_budget = 128  # max_step_tokens of the chunked run
  c.min_token_bucket = 16
  c.min_seq_bucket = 8
  c.modes = MODES
  return c


def validate(c):
  for mode in c.modes:
    if mode not in MODES:
      raise ValueError(f"config.modes: unknown mode {mode!r}; choose from {MODES}")
  if c.prompt_max + c.output_max > c.max_model_len:
    raise ValueError(f"config.prompt_max + config.output_max = {c.prompt_max + c.output_max} exceeds "
                     f"config.max_model_len = {c.max_model_len}")
  if c.max_model_len > c.model.max_position_embeddings:
    raise ValueError("config.max_model_len exceeds config.model.max_position_embeddings")
  if c.chunk_budget < c.max_batch_size:
    raise ValueError(f"config.chunk_budget={c.chunk_budget} must be >= config.max_batch_size={c.max_batch_size}")
  if (c.arrival_rate is not None and c.arrival_rate <= 0) or c.load <= 0 or c.num_requests < 1:
    raise ValueError("config.arrival_rate, config.load and config.num_requests must be positive")


# ------------------------------------------------------------------------------------------------ workload


def workload(c, arrival_rate):
  """[(arrival seconds, prompt ids, output length)] sorted by arrival. The draws do not depend on the rate:
  the arrival gaps are unit exponentials scaled by 1 / arrival_rate."""
  import numpy as np

  rng = np.random.default_rng(c.seed)

  def pareto(lo, alpha, hi):
    return np.minimum(hi, np.floor(lo * (1.0 + rng.pareto(alpha, size=c.num_requests)))).astype(int)

  prompt_lens = pareto(c.prompt_min, c.prompt_alpha, c.prompt_max)
  output_lens = pareto(c.output_min, c.output_alpha, c.output_max)
  gaps = rng.exponential(1.0, size=c.num_requests)
  arrivals = np.cumsum(gaps) - gaps[0]
  return [(float(t / arrival_rate), rng.integers(0, c.model.vocab_size, size=int(p)).tolist(), int(o))
          for t, p, o in zip(arrivals, prompt_lens, output_lens)]


def calibrate(model, c, mean_tokens):
  """Requests per second the continuous engine can take: a full batch of decodes is timed (median of 12
  steps, context ~64) and a request is taken to cost its mean prompt + output tokens at that rate."""
  import numpy as np

  engine = jaxinfer_engine(model, c, "continuous")
  rng = np.random.default_rng(c.seed + 1)
  for _ in range(c.max_batch_size):
    engine.add_request(rng.integers(0, c.model.vocab_size, size=48).tolist(), max_new_tokens=40)
  while engine.num_waiting or any(r.num_pending > 1 for r in engine.scheduler.running):
    engine.step()
  engine.step()  # compiles the decode bucket
  times = []
  for _ in range(12):
    start = time.perf_counter()
    engine.step()
    times.append(time.perf_counter() - start)
  step = float(np.median(times))
  return step, c.max_batch_size / step / mean_tokens


def jaxinfer_engine(model, c, mode):
  import jaxinfer

  return jaxinfer.Engine(model, **engine_kwargs(c, mode))


def engine_kwargs(c, mode):
  common = dict(max_batch_size=c.max_batch_size, page_size=c.page_size, num_pages=c.num_pages,
                max_model_len=c.max_model_len, min_token_bucket=c.min_token_bucket, min_seq_bucket=c.min_seq_bucket,
                max_queue=max(c.num_requests, c.max_batch_size), separate_compile=True)
  if mode == "chunked":
    return dict(common, chunked_prefill=True, max_step_tokens=c.chunk_budget)
  # whole prompts: the budget must hold a full-length prompt beside a full batch of decodes
  return dict(common, chunked_prefill=False, max_step_tokens=c.max_model_len + c.max_batch_size - 1)


def serve(engine, requests, mode):
  """Drives the engine through the workload on the simulated clock; returns per-request records."""
  import numpy as np

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
    # (tokens past a request's own length are computed and dropped), as a fixed-shape batch does
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
    # a step whose bucket is new first compiles it in a separate empty step: that time is not counted
    now += time.perf_counter() - start - (engine.stats["compile_seconds"] - compiling)
    step_times.append(now)
    step_seqs.append(engine.num_running)
    for out in outs:
      r = rec[id_to_index[out.request_id]]
      keep = max(0, min(len(out.new_token_ids), r["output_len"] - len(r["tokens"])))
      r["tokens"].extend([now] * keep)
      if out.finished:
        finished += 1
  for r in rec:
    assert len(r["tokens"]) == r["output_len"], "a request did not produce its tokens"
    r["ttft"] = r["tokens"][0] - r["arrival"]
    r["tpot"] = (r["tokens"][-1] - r["tokens"][0]) / (len(r["tokens"]) - 1) if len(r["tokens"]) > 1 else None
    r["finish"] = r["tokens"][-1]
  gaps = np.concatenate([np.diff(r["tokens"]) for r in rec if len(r["tokens"]) > 1])
  return rec, gaps, dict(step_end=step_times, running=step_seqs)


def summarize(mode, rec, gaps, engine):
  import numpy as np

  total = sum(r["output_len"] for r in rec)
  span = max(r["finish"] for r in rec) - min(r["arrival"] for r in rec)
  ttft = np.array([r["ttft"] for r in rec])
  tpot = np.array([r["tpot"] for r in rec if r["tpot"] is not None])
  ms = lambda x: float(x) * 1e3  # noqa: E731
  return dict(mode=mode, requests=len(rec), output_tokens=int(total), makespan_s=float(span),
              throughput_tok_s=float(total / span), ttft_p50_ms=ms(np.percentile(ttft, 50)),
              ttft_p99_ms=ms(np.percentile(ttft, 99)), tpot_p50_ms=ms(np.percentile(tpot, 50)),
              tpot_p99_ms=ms(np.percentile(tpot, 99)), itl_p99_ms=ms(np.percentile(gaps, 99)),
              steps=engine.stats["steps"], preemptions=engine.stats["preemptions"],
              compilations_during_run=engine.compilations)


def table(rows):
  base = next((r for r in rows if r["mode"] == "static"), rows[0])
  lines = ["| mode | throughput (tok/s) | vs static | TTFT p50 (ms) | TTFT p99 (ms) | TPOT p50 (ms) | TPOT p99 (ms) | "
           "ITL p99 (ms) | steps | preemptions |",
           "|---|---|---|---|---|---|---|---|---|---|"]
  for r in rows:
    ratio = r["throughput_tok_s"] / base["throughput_tok_s"]
    lines.append(f"| {r['mode']} | {r['throughput_tok_s']:.0f} | {ratio:.2f}x"
                 f" | {r['ttft_p50_ms']:.0f} | {r['ttft_p99_ms']:.0f} | {r['tpot_p50_ms']:.1f} | "
                 f"{r['tpot_p99_ms']:.1f} | {r['itl_p99_ms']:.1f} | {r['steps']} | {r['preemptions']} |")
  return "\n".join(lines)


def plot(rows, records, traces, path):
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  import numpy as np

  modes = [r["mode"] for r in rows]
  colors = dict(zip(MODES, ["tab:gray", "tab:blue", "tab:green"]))
  fig, axes = plt.subplots(1, 4, figsize=(22, 4.5))
  ax = axes[0]
  ax.bar(modes, [r["throughput_tok_s"] for r in rows], color=[colors[m] for m in modes])
  ax.set_ylabel("output tokens / s")
  ax.set_title("throughput")
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
    ax.plot(tpot, np.arange(1, len(tpot) + 1) / len(tpot), label=mode, color=colors[mode])
  ax.set_xscale("log")
  ax.set_xlabel("TPOT per request (ms)")
  ax.set_ylabel("fraction of requests")
  ax.set_title("TPOT CDF")
  ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)

  fig, ax = plt.subplots(figsize=(10, 3.5))
  for mode in modes:
    ax.step(traces[mode]["step_end"], traces[mode]["running"], where="post", label=mode, color=colors[mode],
            linewidth=0.8)
  ax.set_xlabel("simulated time (s)")
  ax.set_ylabel("running requests")
  ax.set_title("batch occupancy")
  ax.legend()
  fig.tight_layout()
  fig.savefig(path.replace(".png", "_occupancy.png"), dpi=110)
  plt.close(fig)


# ------------------------------------------------------------------------------------------------ run


def run(c, out_dir):
  validate(c)
  import jax
  import numpy as np

  import jaxinfer

  cfg = jaxinfer.ModelConfig(**c.model.to_dict())
  model = jaxinfer.init_model(cfg, seed=c.seed)
  lengths = workload(c, 1.0)
  mean_tokens = float(np.mean([len(p) + o for _, p, o in lengths]))
  if c.arrival_rate is None:
    step, capacity = calibrate(model, c, mean_tokens)
    rate = c.load * capacity
    calibration = (f"arrival rate {rate:.1f}/s = load {c.load} x estimated capacity {capacity:.1f} requests/s (a "
                   f"{c.max_batch_size}-sequence decode step took {step * 1e3:.1f} ms; {mean_tokens:.0f} prompt + "
                   "output tokens per request)")
  else:
    rate, calibration = c.arrival_rate, f"arrival rate {c.arrival_rate}/s (set)"
  print(calibration, flush=True)
  requests = workload(c, rate)
  prompt_lens = np.array([len(p) for _, p, _ in requests])
  output_lens = np.array([o for _, _, o in requests])
  print(f"workload: {len(requests)} requests over {requests[-1][0]:.1f}s (Poisson {rate:.1f}/s); prompt "
        f"tokens p50 {np.median(prompt_lens):.0f} p99 {np.percentile(prompt_lens, 99):.0f} max {prompt_lens.max()}; "
        f"output tokens p50 {np.median(output_lens):.0f} p99 {np.percentile(output_lens, 99):.0f} max "
        f"{output_lens.max()}", flush=True)
  rows, records, traces = [], {}, {}
  for mode in c.modes:
    engine = jaxinfer_engine(model, c, mode)
    t0 = time.perf_counter()
    rec, gaps, trace = serve(engine, requests, mode)
    row = summarize(mode, rec, gaps, engine)
    rows.append(row)
    records[mode], traces[mode] = rec, trace
    print(f"{mode}: {row['throughput_tok_s']:.0f} tok/s, TTFT p99 {row['ttft_p99_ms']:.0f} ms, TPOT p99 "
          f"{row['tpot_p99_ms']:.1f} ms ({time.perf_counter() - t0:.1f}s wall, {engine.compilations} programs "
          f"compiled in {engine.stats['compile_seconds']:.1f}s)", flush=True)

  os.makedirs(out_dir, exist_ok=True)
  date = datetime.date.today().isoformat()
  header = (f"# serving\n\nMeasured {date}, jax {jax.__version__}, backend {jax.default_backend()} "
            f"({os.cpu_count()} CPU cores, shared machine), model: {cfg.num_layers} layers, hidden {cfg.hidden_size}, "
            f"vocab {cfg.vocab_size}, float32, random weights. Workload: {len(requests)} requests, Poisson "
            f"arrivals, {calibration}; prompt tokens Pareto(min {c.prompt_min}, alpha {c.prompt_alpha}, max "
            f"{c.prompt_max}): p50 {np.median(prompt_lens):.0f}, p99 {np.percentile(prompt_lens, 99):.0f}; output "
            f"tokens Pareto(min {c.output_min}, alpha {c.output_alpha}, max {c.output_max}): p50 "
            f"{np.median(output_lens):.0f}, p99 {np.percentile(output_lens, 99):.0f}. Engine: max_batch_size "
            f"{c.max_batch_size}, page_size {c.page_size}; static and continuous prefill whole prompts; chunked "
            f"uses a {c.chunk_budget}-token step budget.\n\nTime: simulated clock advanced by the measured wall time "
            "of each engine.step() minus the compilation of new step programs (Engine(separate_compile=True) "
            "compiles a new bucket in an empty step first, timed apart); arrivals on the same clock. "
            "TPOT = per-request mean time between its tokens; ITL = time between consecutive tokens of a request.\n\n")
  text = header + table(rows) + "\n"
  with open(os.path.join(out_dir, "results.md"), "w") as f:
    f.write(text)
  with open(os.path.join(out_dir, "metrics.jsonl"), "w") as f:
    for row in rows:
      f.write(json.dumps(row) + "\n")
  with open(os.path.join(out_dir, "config.json"), "w") as f:
    json.dump(c.to_dict(), f, indent=1, default=list)
  plot(rows, records, traces, os.path.join(out_dir, "serving.png"))
  print("\n" + table(rows))
  print(f"\nwrote {out_dir}/results.md, metrics.jsonl, config.json, serving.png, serving_occupancy.png")
  return rows


def main(argv=None):
  from absl import app, flags
  from ml_collections import config_flags

  config_flags.DEFINE_config_dict("config", get_config(), "experiment knobs (override as --config.x=y)")
  flags.DEFINE_string("out", "results/serving", "output folder")

  def _main(_):
    import logging

    logging.getLogger("jaxinfer.engine").setLevel(logging.WARNING)
    run(flags.FLAGS.config, flags.FLAGS.out)

  app.run(_main, argv=argv)


if __name__ == "__main__":
  sys.exit(main())
