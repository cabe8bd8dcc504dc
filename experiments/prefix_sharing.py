"""Hydragen reproduction: shared-prefix decode attention, in isolation and in the engine, plus prefix caching.

  python experiments/prefix_sharing.py --out results/prefix_sharing [--config.parts=attention,engine,ttft]
      [--config.batch=32 --config.engine.prefix_lens="(1024,2048)" ...]

Three parts (each its own table in results.md, its own plot):

attention  One decode step of attention for `batch` sequences that share a prefix and each have their own
           suffix. Baseline: every sequence attends over its own copy of prefix + suffix (what a decode kernel
           without sharing reads: batch x prefix keys). Hydragen: the prefix is attended once as a batched
           matmul over all queries, merged with the per-sequence suffix by log-sum-exp. Both jitted and timed
           in the same process, interleaved; throughput = decoded tokens per second of attention.
engine     jaxinfer.Engine decode throughput for engine.batch requests that share a prefix of each length
           (prefix caching on: the prefix is prefilled once, every request reuses its pages and prefills only
           its own suffix). With shared-prefix attention the step attends over the prefix pages once per
           group; the baseline is the same engine, same pool and cached pages, with grouping switched off
           (scheduler.group_prefixes = False), so every sequence reads the prefix pages itself
           (ragged_paged_attention). Throughput = batch x decode steps / their wall time, after warm-up steps
           (compilation excluded); the two are interleaved per prefix length and the best round is kept.
ttft       Time to first token with and without prefix caching for requests sharing a prompt (a shared
           context of ttft.shared_lens tokens + a question of their own): `sequential` requests arrive one
           after the other finished (the cache is warm for all but the first; median of those), `burst`: all
           arrive at once (mean). Best of ttft.rounds rounds (fresh prompts each), after an untimed round
           that compiles every program.
           Every program is compiled by an identical untimed round first.

Hydragen's claims (Juravsky et al. 2024, CodeLlama-13b on A100s, large batches): up to 32x end-to-end
throughput over vLLM without shared-prefix attention, and "increasing the prefix length from 1K to 16K tokens
decreases Hydragen throughput by less than 15%, while the throughput of baselines drops by over 90%".
"""

from __future__ import annotations

import datetime
import json
import os
import time

import numpy as np
from ml_collections import config_dict

PARTS = ("attention", "engine", "ttft")


def get_config() -> config_dict.ConfigDict:
  c = config_dict.ConfigDict()
  c.parts = "attention,engine,ttft"
  # attention part
  c.batch = 32
  c.q_heads = 8
  c.kv_heads = 2
  c.head_dim = 64
  c.suffix_len = 64
  c.prefix_lens = (1024, 2048, 4096, 8192, 16384)
  c.dtype = "float32"
  c.repeats = 7
  c.seed = 0
  # the model the engine parts serve: random weights, small enough for CPU; 2 layers so that, as in long-
  # context serving, attention rather than the MLP dominates a decode step
  c.model = config_dict.ConfigDict(dict(vocab_size=1024, hidden_size=256, intermediate_size=512, num_layers=2,
                                        num_heads=8, num_kv_heads=2, initializer_range=0.2))
  c.engine = config_dict.ConfigDict(dict(batch=32, page_size=16, suffix_len=15, warm_steps=3, decode_steps=8,
                                         rounds=2, max_step_tokens=1024,
                                         prefix_lens=(1024, 2048, 4096, 8192, 16384)))
  c.ttft = config_dict.ConfigDict(dict(shared_lens=(1024, 2048, 4096), question_len=16, requests=6,
                                       max_step_tokens=512, page_size=16, rounds=3))
  return c


# ------------------------------------------------------------------------------------------------ attention
def time_fn(fn, args, repeats):
  fn(*args).block_until_ready()  # compile + warm
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    fn(*args).block_until_ready()
    times.append(time.perf_counter() - start)
  return float(np.median(times))


def run_attention(cfg) -> list[dict]:
  import jax
  import jax.numpy as jnp

  from pallas_kernels.shared_prefix_attention.reference import shared_prefix_attention_reference
  from pallas_kernels.shared_prefix_attention.xla import shared_prefix_attention as hydragen

  dtype = jnp.dtype(cfg.dtype)

  @jax.jit
  def baseline(q, k, v, kv_lens):
    """Plain decode: each row over its own [prefix + suffix] keys."""
    b, h, d = q.shape
    kvh = k.shape[2]
    qg = q.astype(jnp.float32).reshape(b, kvh, h // kvh, d)
    s = jnp.einsum("bhgd,bshd->bhgs", qg, k.astype(jnp.float32)) * d ** -0.5
    s = jnp.where((jnp.arange(k.shape[1]) < kv_lens[:, None])[:, None, None], s, -jnp.inf)
    p = jax.nn.softmax(s, axis=-1)
    return jnp.einsum("bhgs,bshd->bhgd", p, v.astype(jnp.float32)).reshape(b, h, d).astype(q.dtype)

  shared = jax.jit(hydragen)
  rows = []
  for prefix_len in cfg.prefix_lens:
    ks = jax.random.split(jax.random.key(cfg.seed + prefix_len), 6)
    q = jax.random.normal(ks[0], (cfg.batch, cfg.q_heads, cfg.head_dim), dtype)
    pk = jax.random.normal(ks[1], (prefix_len, cfg.kv_heads, cfg.head_dim), dtype)
    pv = jax.random.normal(ks[2], (prefix_len, cfg.kv_heads, cfg.head_dim), dtype)
    sk = jax.random.normal(ks[3], (cfg.batch, cfg.suffix_len, cfg.kv_heads, cfg.head_dim), dtype)
    sv = jax.random.normal(ks[4], (cfg.batch, cfg.suffix_len, cfg.kv_heads, cfg.head_dim), dtype)
    lens = jax.random.randint(ks[5], (cfg.batch,), 1, cfg.suffix_len + 1)
    full_k = jnp.concatenate([jnp.broadcast_to(pk, (cfg.batch, *pk.shape)), sk], axis=1)
    full_v = jnp.concatenate([jnp.broadcast_to(pv, (cfg.batch, *pv.shape)), sv], axis=1)
    # correctness first: both against the reference at this size
    ref = shared_prefix_attention_reference(q[:4], pk, pv, sk[:4], sv[:4], lens[:4])
    np.testing.assert_allclose(shared(q, pk, pv, sk, sv, lens)[:4], ref, atol=2e-4, rtol=2e-4)
    np.testing.assert_allclose(baseline(q, full_k, full_v, prefix_len + lens)[:4], ref, atol=2e-4, rtol=2e-4)
    t_base, t_shared = [], []
    for _ in range(2):  # interleave so drift on a shared machine hits both alike
      t_base.append(time_fn(baseline, (q, full_k, full_v, prefix_len + lens), cfg.repeats))
      t_shared.append(time_fn(shared, (q, pk, pv, sk, sv, lens), cfg.repeats))
    tb, ts = min(t_base), min(t_shared)
    rows.append(dict(prefix_len=prefix_len, baseline_tok_s=cfg.batch / tb, hydragen_tok_s=cfg.batch / ts,
                     speedup=tb / ts))
    print(f"prefix {prefix_len:6d}: baseline {cfg.batch / tb:10.1f} tok/s  hydragen {cfg.batch / ts:10.1f} tok/s  "
          f"speedup {tb / ts:.2f}x", flush=True)
  return rows


# --------------------------------------------------------------------------------------------------- engine


def _model(cfg, max_len: int):
  import jaxinfer

  mcfg = jaxinfer.ModelConfig(max_position_embeddings=max_len, **cfg.model.to_dict())
  return jaxinfer.init_model(mcfg, seed=cfg.seed)


def run_engine(cfg) -> list[dict]:
  """Decode throughput of engine.batch requests sharing a prefix, with and without shared-prefix attention."""
  from jaxinfer.engine import Engine

  e = cfg.engine
  longest = max(e.prefix_lens) + e.suffix_len + e.warm_steps + e.decode_steps + 16
  model = _model(cfg, longest)
  # pool: the longest prefix twice over (the previous length's pages stay cached until evicted) + the suffixes
  per_seq = -(-(e.suffix_len + e.warm_steps + e.decode_steps + 1) // e.page_size) + 1
  num_pages = 2 * -(-max(e.prefix_lens) // e.page_size) + e.batch * per_seq
  engine = Engine(model, max_batch_size=e.batch, page_size=e.page_size, num_pages=num_pages,
                  max_step_tokens=e.max_step_tokens, min_token_bucket=e.batch, min_seq_bucket=e.batch,
                  max_model_len=longest, enable_prefix_caching=True, enable_shared_prefix_attention=True,
                  max_prefix_groups=1)
  rng = np.random.default_rng(cfg.seed)
  vocab = cfg.model.vocab_size
  rows = []
  for prefix_len in e.prefix_lens:
    prefix = rng.integers(0, vocab, size=prefix_len).tolist()
    start = time.perf_counter()
    engine.run([prefix], max_new_tokens=1, progress=False)  # prefill once: every request below reuses it
    prefill_s = time.perf_counter() - start
    best = {}
    for _ in range(e.rounds):
      for shared in (False, True):
        engine.scheduler.group_prefixes = shared
        ids = [engine.add_request(prefix + rng.integers(0, vocab, size=e.suffix_len).tolist(),
                                  max_new_tokens=e.warm_steps + e.decode_steps + 2) for _ in range(e.batch)]
        for _ in range(e.warm_steps):  # the suffixes' prefill, then decodes (compiles their programs)
          engine.step()
        assert engine.num_running == e.batch, "the batch did not fit"
        groups = engine.stats["shared_prefix_groups"]
        start = time.perf_counter()
        for _ in range(e.decode_steps):
          outs = engine.step()
          assert len(outs) == e.batch
        elapsed = time.perf_counter() - start
        assert (engine.stats["shared_prefix_groups"] > groups) == shared
        for i in ids:
          engine.cancel(i)
        engine.step()  # reports the cancellations
        best[shared] = max(best.get(shared, 0.0), e.batch * e.decode_steps / elapsed)
    engine.check_pages()
    rows.append(dict(prefix_len=prefix_len, baseline_tok_s=best[False], hydragen_tok_s=best[True],
                     speedup=best[True] / best[False], prefill_s=prefill_s))
    print(f"engine prefix {prefix_len:6d}: baseline {best[False]:8.1f} tok/s  shared-prefix {best[True]:8.1f} "
          f"tok/s  speedup {best[True] / best[False]:.2f}x  (prefix prefilled once in {prefill_s:.1f} s)",
          flush=True)
  engine.scheduler.group_prefixes = True
  return rows


# ----------------------------------------------------------------------------------------------------- ttft


def _ttft_round(engine, prompts, burst: bool) -> list[float]:
  """Seconds from add_request to first token for each prompt (all at once if burst, else one by one)."""
  ttft = []
  pending = list(prompts)
  while pending:
    batch = pending if burst else pending[:1]
    pending = [] if burst else pending[1:]
    start = time.perf_counter()
    added = {engine.add_request(p, max_new_tokens=1): None for p in batch}
    while any(v is None for v in added.values()):
      for out in engine.step():
        if out.request_id in added and added[out.request_id] is None:
          added[out.request_id] = time.perf_counter() - start
    ttft += list(added.values())
  return ttft


def run_ttft(cfg) -> list[dict]:
  from jaxinfer.engine import Engine

  t = cfg.ttft
  longest = max(t.shared_lens) + t.question_len + 8
  model = _model(cfg, longest)
  rng = np.random.default_rng(cfg.seed + 1)
  vocab = cfg.model.vocab_size
  num_pages = (t.requests + 2) * -(-longest // t.page_size)
  rows = []
  for shared_len in t.shared_lens:
    row = dict(shared_len=shared_len)
    for caching in (False, True):
      engine = Engine(model, max_batch_size=max(8, t.requests), page_size=t.page_size, num_pages=num_pages,
                      max_step_tokens=t.max_step_tokens, max_model_len=longest, enable_prefix_caching=caching)

      def prompts():
        context = rng.integers(0, vocab, size=shared_len).tolist()
        return [context + rng.integers(0, vocab, size=t.question_len).tolist() for _ in range(t.requests)]

      for burst in (False, True):
        _ttft_round(engine, prompts(), burst)  # untimed: compiles every program this round needs
        engine.reset_prefix_cache()
        key = f"{'burst' if burst else 'seq'}_{'cache' if caching else 'nocache'}"
        for _ in range(t.rounds):  # fresh prompts each round; the best round of each statistic is kept
          times = _ttft_round(engine, prompts(), burst)
          engine.reset_prefix_cache()
          for stat, value in (("first", times[0]), ("rest", float(np.median(times[1:]))),
                              ("mean", float(np.mean(times)))):
            row[f"{key}_{stat}_ms"] = min(row.get(f"{key}_{stat}_ms", np.inf), 1e3 * value)
      if caching:
        row["hit_tokens"] = engine.prefix_stats["hit_tokens"]
    for mode in ("seq", "burst"):
      row[f"{mode}_speedup"] = row[f"{mode}_nocache_mean_ms"] / row[f"{mode}_cache_mean_ms"]
    rows.append(row)
    print(f"ttft shared {shared_len:5d}: sequential (later requests) {row['seq_nocache_rest_ms']:7.1f} -> "
          f"{row['seq_cache_rest_ms']:6.1f} ms; burst mean {row['burst_nocache_mean_ms']:7.1f} -> "
          f"{row['burst_cache_mean_ms']:7.1f} ms", flush=True)
  return rows


# --------------------------------------------------------------------------------------------------- report


def _drop(rows, key):
  return 1 - rows[-1][key] / rows[0][key]


def report(results, cfg, out_dir):
  import jax
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  os.makedirs(out_dir, exist_ok=True)
  device = jax.devices()[0].device_kind
  lines = [f"# Shared prefixes: Hydragen attention and prefix caching on {device} ({os.cpu_count()} cores), "
           f"jax {jax.__version__}, {datetime.date.today().isoformat()}", ""]
  m = cfg.model
  model_desc = (f"{m.num_layers} layers, hidden {m.hidden_size}, {m.num_heads} q / {m.num_kv_heads} kv heads, "
                f"vocab {m.vocab_size}, float32, random weights")
  rows = results.get("attention")
  if rows:
    lines += ["## Attention only (one decode step)", "",
              f"batch {cfg.batch}, {cfg.q_heads} q / {cfg.kv_heads} kv heads, head_dim {cfg.head_dim}, suffix "
              f"{cfg.suffix_len}, {cfg.dtype}; median of {cfg.repeats}", "",
              "| prefix | baseline tok/s | hydragen tok/s | speedup |", "|---|---|---|---|"]
    lines += [f"| {r['prefix_len']} | {r['baseline_tok_s']:.1f} | {r['hydragen_tok_s']:.1f} | {r['speedup']:.2f}x |"
              for r in rows]
    lines += ["", f"Throughput drop from prefix {rows[0]['prefix_len']} to {rows[-1]['prefix_len']}: baseline "
              f"{100 * _drop(rows, 'baseline_tok_s'):.0f}%, hydragen {100 * _drop(rows, 'hydragen_tok_s'):.0f}% "
              "(paper: baselines > 90%, Hydragen < 15%).", ""]
    fig, ax = plt.subplots(figsize=(6, 4))
    xs = [r["prefix_len"] for r in rows]
    ax.plot(xs, [r["baseline_tok_s"] for r in rows], "o-", label="per-sequence attention (baseline)")
    ax.plot(xs, [r["hydragen_tok_s"] for r in rows], "s-", label="shared-prefix attention (Hydragen)")
    ax.set(xscale="log", yscale="log", xlabel="shared prefix length (tokens)",
           ylabel="decode attention throughput (tok/s)", title=f"attention only, batch {cfg.batch}, {device}")
    ax.set_xscale("log", base=2)
    ax.legend()
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, "throughput.png"), dpi=120)
    plt.close(fig)
  rows = results.get("engine")
  if rows:
    e = cfg.engine
    lines += ["## Engine decode throughput, batch sharing a prefix", "",
              f"jaxinfer.Engine, {model_desc}; batch {e.batch} requests = the shared prefix (prefilled once, "
              f"reused through the prefix cache) + {e.suffix_len} tokens of their own; page size {e.page_size}; "
              f"best of {e.rounds} interleaved rounds of {e.decode_steps} decode steps. Baseline: the same "
              "engine with prefix grouping off (every sequence reads the prefix pages itself).", "",
              "| prefix | baseline tok/s | shared-prefix attention tok/s | speedup |", "|---|---|---|---|"]
    lines += [f"| {r['prefix_len']} | {r['baseline_tok_s']:.0f} | {r['hydragen_tok_s']:.0f} | {r['speedup']:.2f}x |"
              for r in rows]
    lines += ["", f"Throughput drop from prefix {rows[0]['prefix_len']} to {rows[-1]['prefix_len']}: baseline "
              f"{100 * _drop(rows, 'baseline_tok_s'):.0f}%, shared-prefix attention "
              f"{100 * _drop(rows, 'hydragen_tok_s'):.0f}% (paper: baselines > 90%, Hydragen < 15%; up to 32x "
              f"end-to-end). Here: up to {max(r['speedup'] for r in rows):.1f}x.", ""]
    fig, ax = plt.subplots(figsize=(6, 4))
    xs = [r["prefix_len"] for r in rows]
    ax.plot(xs, [r["baseline_tok_s"] for r in rows], "o-", label="engine, per-sequence attention")
    ax.plot(xs, [r["hydragen_tok_s"] for r in rows], "s-", label="engine, shared-prefix attention")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set(xlabel="shared prefix length (tokens)", ylabel="decode throughput (tok/s)",
           title=f"engine decode, batch {e.batch}, {device}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, "engine_throughput.png"), dpi=120)
    plt.close(fig)
  rows = results.get("ttft")
  if rows:
    t = cfg.ttft
    lines += ["## Time to first token, requests sharing a prompt", "",
              f"jaxinfer.Engine, same model; {t.requests} requests = a shared context + {t.question_len} tokens "
              f"of their own; chunked prefill, {t.max_step_tokens}-token steps, page size {t.page_size}; best of "
              f"{t.rounds} rounds. "
              "Sequential: each request arrives when the previous one has its token (later = median of requests "
              f"2..{t.requests}, which find the context cached); burst: all arrive at once (mean).", "",
              "| shared context | sequential first (ms) | sequential later, no cache (ms) | sequential later, cache "
              "(ms) | speedup | burst mean, no cache (ms) | burst mean, cache (ms) | speedup |",
              "|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['shared_len']} | {r['seq_cache_first_ms']:.0f} | {r['seq_nocache_rest_ms']:.0f} | "
              f"{r['seq_cache_rest_ms']:.1f} | {r['seq_nocache_rest_ms'] / r['seq_cache_rest_ms']:.1f}x | "
              f"{r['burst_nocache_mean_ms']:.0f} | {r['burst_cache_mean_ms']:.0f} | {r['burst_speedup']:.2f}x |"
              for r in rows]
    lines.append("")
    fig, ax = plt.subplots(figsize=(6, 4))
    xs = [r["shared_len"] for r in rows]
    for key, label, style in (("seq_nocache_rest_ms", "sequential, no cache", "o-"),
                              ("seq_cache_rest_ms", "sequential, prefix cache", "s-"),
                              ("burst_nocache_mean_ms", "burst, no cache", "o--"),
                              ("burst_cache_mean_ms", "burst, prefix cache", "s--")):
      ax.plot(xs, [r[key] for r in rows], style, label=label)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set(xlabel="shared context (tokens)", ylabel="time to first token (ms)", title=f"TTFT, {device}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, "ttft.png"), dpi=120)
    plt.close(fig)
  text = "\n".join(lines)
  print("\n" + text)
  with open(os.path.join(out_dir, "results.md"), "w") as f:
    f.write(text + "\n")
  with open(os.path.join(out_dir, "metrics.json"), "w") as f:
    json.dump(dict(config=cfg.to_dict(), **results), f, indent=2, default=list)


def run(cfg, out_dir) -> dict:
  parts = [p.strip() for p in cfg.parts.split(",") if p.strip()]
  unknown = sorted(set(parts) - set(PARTS))
  if unknown:
    raise ValueError(f"config.parts: unknown part(s) {unknown}; choose from {list(PARTS)}")
  runners = {"attention": run_attention, "engine": run_engine, "ttft": run_ttft}
  results = {}
  for part in parts:
    start = time.perf_counter()
    results[part] = runners[part](cfg)
    print(f"[{part}: {time.perf_counter() - start:.0f} s]", flush=True)
  report(results, cfg, out_dir)
  return results


def main(argv=None):
  from absl import app, flags
  from ml_collections import config_flags

  config_flags.DEFINE_config_dict("config", get_config(), "experiment knobs (override as --config.x=y)")
  flags.DEFINE_string("out", "results/prefix_sharing", "output folder")

  def _main(_):
    import logging

    logging.getLogger("jaxinfer.engine").setLevel(logging.WARNING)
    run(flags.FLAGS.config, flags.FLAGS.out)

  app.run(_main, argv=argv)


if __name__ == "__main__":
  main()
