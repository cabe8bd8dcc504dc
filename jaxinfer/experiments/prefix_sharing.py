"""Driver: Hydragen reproduction, shared-prefix decode attention in isolation and in the engine, plus prefix caching.

Config: experiments/prefix_sharing.py (sections `model`, `attention`, `engine_decode`, `ttft`: the dataclasses
below; each part runs when its section has `enabled=True`, and gets its own table in results.md and its plot).

attention      One decode step of attention for `batch` sequences that share a prefix and each have their own
               suffix. Baseline: every sequence attends over its own copy of prefix + suffix (what a decode
               kernel without sharing reads: batch x prefix keys). Hydragen: the prefix is attended once as a
               batched matmul over all queries, merged with the per-sequence suffix by log-sum-exp. Both jitted,
               checked against the reference, and timed in the same run, interleaved.
engine_decode  jaxinfer.Engine decode throughput for `batch` requests sharing a prefix of each length (prefix
               caching on: the prefix is prefilled once, every request reuses its pages). With shared-prefix
               attention the step attends over the prefix pages once per group; the baseline is the same
               engine, pool and cached pages with grouping off (scheduler.group_prefixes = False), so every
               sequence reads the prefix pages itself (ragged_paged_attention). Throughput = batch x decode
               steps / their wall time after warm-up steps; interleaved rounds, the best kept.
ttft           Time to first token with and without prefix caching for requests sharing a prompt (a shared
               context + a question of their own): `sequential` requests arrive one after the other finished
               (the cache is warm for all but the first; median of those), `burst`: all at once (mean). Best of
               `rounds` rounds (fresh prompts each), after an untimed round that compiles every program.

The model's max_position_embeddings is set by each engine part to the longest sequence it serves.
Hydragen's claims (Juravsky et al. 2024, CodeLlama-13b on A100s): up to 32x end-to-end throughput over vLLM
without shared-prefix attention, and from a 1K to a 16K prefix "Hydragen throughput [decreases] by less than
15%, while the throughput of baselines drops by over 90%".
"""

from __future__ import annotations

import dataclasses
import time

import numpy as np

from jaxinfer.experiments import results
from jaxinfer.experiments.sections import check, read, replace
from jaxinfer.experiments.timing import Case, compare, time_call

PAPER = "paper: baselines > 90%, Hydragen < 15%"


def _positive(obj, *names):
  for name in names:
    check(type(obj), name, getattr(obj, name) >= 1, f"must be >= 1, got {getattr(obj, name)}")


def _lengths(obj, name):
  value = getattr(obj, name)
  check(type(obj), name, bool(value) and all(x >= 1 for x in value), f"need positive lengths, got {value}")


@dataclasses.dataclass(frozen=True)
class AttentionPartConfig:
  SECTION = "attention"
  enabled: bool = True
  batch: int = 32
  q_heads: int = 8
  kv_heads: int = 2
  head_dim: int = 64
  suffix_len: int = 64
  prefix_lens: tuple[int, ...] = (1024, 2048, 4096, 8192, 16384)
  dtype: str = "float32"
  repeats: int = 7
  rounds: int = 2  # interleaved rounds of `repeats` timed calls each (median of all)

  def __post_init__(self):
    _positive(self, "batch", "q_heads", "kv_heads", "head_dim", "suffix_len", "repeats", "rounds")
    _lengths(self, "prefix_lens")
    check(type(self), "q_heads", self.q_heads % self.kv_heads == 0, f"{self.q_heads} is not a multiple of kv_heads")
    check(type(self), "dtype", self.dtype in ("float32", "bfloat16"), f"got {self.dtype!r}")


@dataclasses.dataclass(frozen=True)
class EngineDecodePartConfig:
  SECTION = "engine_decode"
  enabled: bool = True
  batch: int = 32
  page_size: int = 16
  suffix_len: int = 15
  warm_steps: int = 3
  decode_steps: int = 8
  rounds: int = 2
  max_step_tokens: int = 1024
  prefix_lens: tuple[int, ...] = (1024, 2048, 4096, 8192, 16384)

  def __post_init__(self):
    _positive(self, "batch", "page_size", "suffix_len", "warm_steps", "decode_steps", "rounds")
    _lengths(self, "prefix_lens")
    check(type(self), "max_step_tokens", self.max_step_tokens >= self.batch * (self.suffix_len + 1),
          f"{self.max_step_tokens} cannot hold the batch's suffixes ({self.batch} x {self.suffix_len + 1})")


@dataclasses.dataclass(frozen=True)
class TTFTPartConfig:
  SECTION = "ttft"
  enabled: bool = True
  shared_lens: tuple[int, ...] = (1024, 2048, 4096)
  question_len: int = 16
  requests: int = 6
  max_step_tokens: int = 512
  page_size: int = 16
  rounds: int = 3

  def __post_init__(self):
    _positive(self, "question_len", "max_step_tokens", "page_size", "rounds")
    _lengths(self, "shared_lens")
    check(type(self), "requests", self.requests >= 2, f"needs >= 2 (first vs later requests), got {self.requests}")


SMOKE_MODEL = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_layers=1, num_heads=4, num_kv_heads=2)
SMOKE = dict(attention=dict(batch=4, q_heads=4, kv_heads=2, head_dim=16, suffix_len=8, prefix_lens=(64, 256),
                            repeats=2, rounds=1),
             engine_decode=dict(batch=4, suffix_len=7, warm_steps=2, decode_steps=3, rounds=1, max_step_tokens=128,
                                prefix_lens=(128,)),
             ttft=dict(shared_lens=(128,), question_len=8, requests=3, max_step_tokens=128, rounds=1))


# ------------------------------------------------------------------------------------------------ attention


def run_attention(a: AttentionPartConfig, model, seed: int) -> list[dict]:
  del model  # attention only: no model
  import jax
  import jax.numpy as jnp

  from pallas_kernels.shared_prefix_attention.reference import shared_prefix_attention_reference
  from pallas_kernels.shared_prefix_attention.xla import shared_prefix_attention as hydragen

  dtype = jnp.dtype(a.dtype)

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

  shared, reference = jax.jit(hydragen), jax.jit(shared_prefix_attention_reference)
  rows = []
  for prefix_len in a.prefix_lens:
    rng = np.random.default_rng(seed + prefix_len)  # fresh inputs drawn on the host: no program per shape
    normal = lambda *shape: rng.standard_normal(shape, dtype=np.float32)  # noqa: E731
    q, pk, pv = (normal(a.batch, a.q_heads, a.head_dim), normal(prefix_len, a.kv_heads, a.head_dim),
                 normal(prefix_len, a.kv_heads, a.head_dim))
    sk, sv = (normal(a.batch, a.suffix_len, a.kv_heads, a.head_dim) for _ in range(2))
    lens = rng.integers(1, a.suffix_len + 1, size=a.batch).astype(np.int32)
    full_k = np.concatenate([np.broadcast_to(pk, (a.batch, *pk.shape)), sk], axis=1)
    full_v = np.concatenate([np.broadcast_to(pv, (a.batch, *pv.shape)), sv], axis=1)
    as_jax = lambda x: jnp.asarray(x, jnp.int32 if x.dtype == np.int32 else dtype)  # noqa: E731
    # correctness first: both against the reference at this size (its first 4 rows)
    ref = np.asarray(reference(*map(as_jax, (q[:4], pk, pv, sk[:4], sv[:4], lens[:4]))))
    q, pk, pv, sk, sv, lens, full_k, full_v = map(as_jax, (q, pk, pv, sk, sv, lens, full_k, full_v))
    kv_lens = lens + prefix_len
    np.testing.assert_allclose(np.asarray(shared(q, pk, pv, sk, sv, lens))[:4], ref, atol=2e-4, rtol=2e-4)
    np.testing.assert_allclose(np.asarray(baseline(q, full_k, full_v, kv_lens))[:4], ref, atol=2e-4, rtol=2e-4)
    c = compare({"baseline": lambda: baseline(q, full_k, full_v, kv_lens),
                 "hydragen": lambda: shared(q, pk, pv, sk, sv, lens)},
                baseline="baseline", rounds=a.rounds, warmup=1, repeats=a.repeats, stat="median")
    rows.append(dict(prefix_len=prefix_len, baseline_tok_s=a.batch / c.time("baseline"),
                     hydragen_tok_s=a.batch / c.time("hydragen"), speedup=c.speedup("hydragen")))
    print(f"attention prefix {prefix_len:6d}: baseline {rows[-1]['baseline_tok_s']:10.1f} tok/s  hydragen "
          f"{rows[-1]['hydragen_tok_s']:10.1f} tok/s  speedup {rows[-1]['speedup']:.2f}x", flush=True)
  return rows


# --------------------------------------------------------------------------------------------------- engine


def _engine_decode_len(e: EngineDecodePartConfig) -> int:
  return max(e.prefix_lens) + e.suffix_len + e.warm_steps + e.decode_steps + 16


def _ttft_len(t: TTFTPartConfig) -> int:
  return max(t.shared_lens) + t.question_len + 8


def run_engine_decode(e: EngineDecodePartConfig, model, seed: int) -> list[dict]:
  """Decode throughput of e.batch requests sharing a prefix, with and without shared-prefix attention."""
  from jaxinfer.engine import Engine

  longest = _engine_decode_len(e)
  # pool: the longest prefix twice over (the previous length's pages stay cached until evicted) + the suffixes
  per_seq = -(-(e.suffix_len + e.warm_steps + e.decode_steps + 1) // e.page_size) + 1
  num_pages = 2 * -(-max(e.prefix_lens) // e.page_size) + e.batch * per_seq
  engine = Engine(model, max_batch_size=e.batch, page_size=e.page_size,
                  num_pages=num_pages, max_step_tokens=e.max_step_tokens, min_token_bucket=e.batch,
                  min_seq_bucket=e.batch, max_model_len=longest, enable_prefix_caching=True,
                  enable_shared_prefix_attention=True, max_prefix_groups=1)
  rng = np.random.default_rng(seed)
  vocab = model.config.vocab_size
  rows = []
  for prefix_len in e.prefix_lens:
    prefix = rng.integers(0, vocab, size=prefix_len).tolist()
    start = time.perf_counter()
    engine.run([prefix], max_new_tokens=1, progress=False)  # prefill once: every request below reuses it
    prefill_s = time.perf_counter() - start
    c = compare({name: _decode_case(engine, e, prefix, rng, shared) for name, shared in
                 (("baseline", False), ("shared", True))}, baseline="baseline", rounds=e.rounds, warmup=0,
                repeats=1, stat="min")
    engine.check_pages()
    rows.append(dict(prefix_len=prefix_len, baseline_tok_s=e.batch * e.decode_steps / c.time("baseline"),
                     hydragen_tok_s=e.batch * e.decode_steps / c.time("shared"), speedup=c.speedup("shared"),
                     prefill_s=prefill_s))
    print(f"engine prefix {prefix_len:6d}: baseline {rows[-1]['baseline_tok_s']:8.1f} tok/s  shared-prefix "
          f"{rows[-1]['hydragen_tok_s']:8.1f} tok/s  speedup {rows[-1]['speedup']:.2f}x  (prefix prefilled once in "
          f"{prefill_s:.1f} s)", flush=True)
  engine.scheduler.group_prefixes = True
  return rows


def _decode_case(engine, e: EngineDecodePartConfig, prefix, rng, shared: bool) -> Case:
  """Set-up: the batch admitted, suffixes prefilled, warm decodes (compiles). Timed: e.decode_steps decode steps.
  Teardown: the batch cancelled."""
  state = {}

  def setup():
    engine.scheduler.group_prefixes = shared
    state["ids"] = [engine.add_request(prefix + rng.integers(0, engine.config.vocab_size, size=e.suffix_len).tolist(),
                                       max_new_tokens=e.warm_steps + e.decode_steps + 2) for _ in range(e.batch)]
    for _ in range(e.warm_steps):
      engine.step()
    assert engine.num_running == e.batch, "the batch did not fit"
    state["groups"] = engine.stats["shared_prefix_groups"]

  def decode():
    for _ in range(e.decode_steps):
      assert len(engine.step()) == e.batch

  def teardown():
    assert (engine.stats["shared_prefix_groups"] > state["groups"]) == shared, "prefix grouping did not follow"
    for i in state["ids"]:
      engine.cancel(i)
    engine.step()  # reports the cancellations

  return Case(decode, setup, teardown)


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


def run_ttft(t: TTFTPartConfig, model, seed: int) -> list[dict]:
  from jaxinfer.engine import Engine

  longest = _ttft_len(t)
  rng = np.random.default_rng(seed + 1)
  vocab = model.config.vocab_size
  num_pages = (t.requests + 2) * -(-longest // t.page_size)
  rows = []
  for shared_len in t.shared_lens:

    def prompts():
      context = rng.integers(0, vocab, size=shared_len).tolist()
      return [context + rng.integers(0, vocab, size=t.question_len).tolist() for _ in range(t.requests)]

    row = dict(shared_len=shared_len)
    for caching in (False, True):
      engine = Engine(model, max_batch_size=max(8, t.requests), page_size=t.page_size, num_pages=num_pages,
                      max_step_tokens=t.max_step_tokens, max_model_len=longest, enable_prefix_caching=caching)
      for burst in (False, True):
        # the untimed warm-up round compiles every program a round needs; fresh prompts every round
        rounds = time_call(Case(lambda burst=burst: _ttft_round(engine, prompts(), burst),
                                teardown=engine.reset_prefix_cache), warmup=1, repeats=t.rounds).results
        key = f"{'burst' if burst else 'seq'}_{'cache' if caching else 'nocache'}"
        for stat, fn in (("first", lambda x: x[0]), ("rest", lambda x: np.median(x[1:])), ("mean", np.mean)):
          row[f"{key}_{stat}_ms"] = 1e3 * float(min(fn(times) for times in rounds))  # the best round
      if caching:
        row["hit_tokens"] = engine.prefix_stats["hit_tokens"]
    for mode in ("seq", "burst"):
      row[f"{mode}_speedup"] = row[f"{mode}_nocache_mean_ms"] / row[f"{mode}_cache_mean_ms"]
    row["seq_rest_speedup"] = row["seq_nocache_rest_ms"] / row["seq_cache_rest_ms"]
    rows.append(row)
    print(f"ttft shared {shared_len:5d}: sequential (later requests) {row['seq_nocache_rest_ms']:7.1f} -> "
          f"{row['seq_cache_rest_ms']:6.1f} ms; burst mean {row['burst_nocache_mean_ms']:7.1f} -> "
          f"{row['burst_cache_mean_ms']:7.1f} ms", flush=True)
  return rows


# --------------------------------------------------------------------------------------------------- report


def _drop(rows, key) -> str:
  return f"{100 * (1 - rows[-1][key] / rows[0][key]):.0f}%"


def _plot(rows, xkey, series, xlabel, ylabel, title):
  plt = results.pyplot()
  fig, ax = plt.subplots(figsize=(6, 4))
  for key, label, style in series:
    ax.plot([r[xkey] for r in rows], [r[key] for r in rows], style, label=label)
  ax.set_xscale("log", base=2)
  ax.set_yscale("log")
  ax.set(xlabel=xlabel, ylabel=ylabel, title=title)
  ax.legend()
  return fig


def _throughput_report(out, rows, title: str, intro: str, shared: str, spec: str, labels, ylabel: str,
                       plot_title: str, png: str, paper: str = PAPER, after: str = "") -> None:
  """A part that compares per-sequence (baseline) and shared-prefix throughput over prefix lengths."""
  out.section(title, intro,
              results.table_from(rows, (("prefix", "prefix_len", None), ("baseline tok/s", "baseline_tok_s", spec),
                                        (f"{shared} tok/s", "hydragen_tok_s", spec),
                                        ("speedup", "speedup", "{:.2f}x"))),
              f"Throughput drop from prefix {rows[0]['prefix_len']} to {rows[-1]['prefix_len']}: baseline "
              f"{_drop(rows, 'baseline_tok_s')}, {shared} {_drop(rows, 'hydragen_tok_s')} ({paper}).{after}")
  out.figure(_plot(rows, "prefix_len", (("baseline_tok_s", labels[0], "o-"), ("hydragen_tok_s", labels[1], "s-")),
                   "shared prefix length (tokens)", ylabel, plot_title), png)


def report_attention(out, rows, a: AttentionPartConfig, model_desc: str, device: str) -> None:
  _throughput_report(out, rows, "Attention only (one decode step)",
                     f"batch {a.batch}, {a.q_heads} q / {a.kv_heads} kv heads, head_dim {a.head_dim}, suffix "
                     f"{a.suffix_len}, {a.dtype}; median of {a.rounds} interleaved rounds x {a.repeats} calls",
                     "hydragen", ".1f", ("per-sequence attention (baseline)", "shared-prefix attention (Hydragen)"),
                     "decode attention throughput (tok/s)", f"attention only, batch {a.batch}, {device}",
                     "throughput.png")


def report_engine_decode(out, rows, e: EngineDecodePartConfig, model_desc: str, device: str) -> None:
  _throughput_report(out, rows, "Engine decode throughput, batch sharing a prefix",
                     f"jaxinfer.Engine, {model_desc}; batch {e.batch} requests = the shared prefix (prefilled once, "
                     f"reused through the prefix cache) + {e.suffix_len} tokens of their own; page size {e.page_size}; "
                     f"best of {e.rounds} interleaved rounds of {e.decode_steps} decode steps. Baseline: the same "
                     "engine with prefix grouping off (every sequence reads the prefix pages itself).",
                     "shared-prefix attention", ".0f",
                     ("engine, per-sequence attention", "engine, shared-prefix attention"),
                     "decode throughput (tok/s)", f"engine decode, batch {e.batch}, {device}", "engine_throughput.png",
                     paper=f"{PAPER}; up to 32x end-to-end",
                     after=f" Here: up to {max(r['speedup'] for r in rows):.1f}x.")


def report_ttft(out, rows, t: TTFTPartConfig, model_desc: str, device: str) -> None:
  out.section("Time to first token, requests sharing a prompt",
              f"jaxinfer.Engine, same model; {t.requests} requests = a shared context + {t.question_len} tokens of "
              f"their own; chunked prefill, {t.max_step_tokens}-token steps, page size {t.page_size}; best of "
              f"{t.rounds} rounds. Sequential: each request arrives when the previous one has its token (later = "
              f"median of requests 2..{t.requests}, which find the context cached); burst: all arrive at once (mean).",
              results.table_from(rows, (
                  ("shared context", "shared_len", None), ("sequential first (ms)", "seq_cache_first_ms", ".0f"),
                  ("sequential later, no cache (ms)", "seq_nocache_rest_ms", ".0f"),
                  ("sequential later, cache (ms)", "seq_cache_rest_ms", ".1f"),
                  ("speedup", "seq_rest_speedup", "{:.1f}x"),
                  ("burst mean, no cache (ms)", "burst_nocache_mean_ms", ".0f"),
                  ("burst mean, cache (ms)", "burst_cache_mean_ms", ".0f"), ("speedup", "burst_speedup", "{:.2f}x"))))
  out.figure(_plot(rows, "shared_len", (("seq_nocache_rest_ms", "sequential, no cache", "o-"),
                                        ("seq_cache_rest_ms", "sequential, prefix cache", "s-"),
                                        ("burst_nocache_mean_ms", "burst, no cache", "o--"),
                                        ("burst_cache_mean_ms", "burst, prefix cache", "s--")),
                   "shared context (tokens)", "time to first token (ms)", f"TTFT, {device}"), "ttft.png")


# ------------------------------------------------------------------------------------------------------ run

# each part: its section, how it is measured (section, model, seed) -> rows, how it is reported
PARTS = ((AttentionPartConfig, run_attention, report_attention),
         (EngineDecodePartConfig, run_engine_decode, report_engine_decode),
         (TTFTPartConfig, run_ttft, report_ttft))
LONGEST = {EngineDecodePartConfig: _engine_decode_len, TTFTPartConfig: _ttft_len}  # parts that serve a model


def run(config) -> dict:
  import logging

  from jaxinfer.models.config import ModelConfig
  from jaxinfer.models.transformer import init_model

  sections = [read(config, cls, SMOKE[cls.SECTION]) for cls, _, _ in PARTS]
  m = read(config, ModelConfig, SMOKE_MODEL)
  check("attention", "enabled", any(s.enabled for s in sections), "every part is disabled: nothing to run")
  logging.getLogger("jaxinfer.engine").setLevel(logging.WARNING)
  model_desc = (f"{m.num_layers} layers, hidden {m.hidden_size}, {m.num_heads} q / {m.num_kv_heads} kv heads, "
                f"vocab {m.vocab_size}, {m.dtype}, random weights")
  # one model for the engine parts, long enough for the longest sequence either serves
  longest = max((LONGEST[type(s)](s) for s in sections if s.enabled and type(s) in LONGEST), default=0)
  model = init_model(replace(m, "model", max_position_embeddings=longest), seed=config.seed) if longest else None
  found = {}
  with results.open_run(config) as out:
    for section, (cls, measure, report) in zip(sections, PARTS):
      if not section.enabled:
        continue
      start = time.perf_counter()
      found[cls.SECTION] = rows = measure(section, model, config.seed)
      for row in rows:
        out.log(cls.SECTION, **row)
      report(out, rows, section, model_desc, out.env["device_kind"])
      print(f"[{cls.SECTION}: {time.perf_counter() - start:.0f} s]", flush=True)
    print(out.markdown)
  return found
