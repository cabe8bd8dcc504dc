"""Driver: KV-cache eviction policies on a model trained by the quickstart recipe at a 1K context: perplexity
on long stdlib files and a retrieval probe against the KV budget, the window-only ablation, KV bytes per token
and engine decode speed at each budget, set beside StreamingLLM's and SnapKV's claims.

Config: experiments/kv_compression.py (section `kv_compression`, KVCompressionConfig below).

Parts:
  quality   teacher forcing through the dense references (jaxinfer/engine/kv_policies/reference.py, which the
            engine is tested against token for token): for each budget (a fraction of `length`), mean NLL over
            the second half of each file under full KV, StreamingLLM (sinks + window), window only, SnapKV (the
            first half is the prompt, compressed to the budget at its end) and Duo (heads calibrated on another
            file, retrieval_heads of them full, the rest sinks + window). H2O's kept set depends on every step's
            eviction, so it is measured in the engine part only.
  probe     a line `<name> = <value>` planted near the start of a file, the file, then `<name> =`: greedy next
            token == the value's first token, per policy and budget (accuracy over probe_trials files/names).
  engine    jaxinfer.Engine with each policy at each of engine_fractions: a decode_prompt-token prompt then
            decode_tokens new tokens, timed (median of rounds; ratio to the no-policy engine in the same run);
            KV bytes per token = pages the request held at the end x page bytes / its tokens.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import numpy as np

from jaxinfer.config import path_field, resolve_paths
from jaxinfer.experiments import results
from jaxinfer.experiments.sections import check, read
from jaxinfer.experiments.timing import Case, compare

POLICIES = ("streaming", "window_only", "snapkv", "duo")


@dataclasses.dataclass(frozen=True)
class KVCompressionConfig:
  SECTION = "kv_compression"
  checkpoint: str = path_field("results/kv_model/hf")  # "" (smoke): a random model, byte tokens
  files: tuple[str, ...] = ("argparse.py", "inspect.py", "textwrap.py", "typing.py")
  calibration_file: str = "tarfile.py"
  length: int = 1024
  fractions: tuple[float, ...] = (0.05, 0.1, 0.25, 0.5, 1.0)
  sink_tokens: int = 4
  snapkv_window: int = 32
  pool_kernel: int = 7
  retrieval_heads: float = 0.5
  probe_trials: int = 8
  engine_fractions: tuple[float, ...] = (0.1, 0.5)
  engine_policies: tuple[str, ...] = ("streaming", "snapkv", "h2o")
  decode_prompt: int = 768
  decode_tokens: int = 32
  page_size: int = 16
  rounds: int = 2

  def __post_init__(self):
    cls = type(self)
    for name in ("length", "sink_tokens", "snapkv_window", "pool_kernel", "probe_trials", "decode_prompt",
                 "decode_tokens", "page_size", "rounds"):
      value = getattr(self, name)
      check(cls, name, isinstance(value, int) and value >= 1, f"must be a positive integer, got {value!r}")
    for name in ("fractions", "engine_fractions"):
      value = getattr(self, name)
      check(cls, name, bool(value) and all(0 < f <= 1 for f in value), f"fractions in (0, 1], got {value!r}")
    check(cls, "files", bool(self.files), "name at least one stdlib file")
    check(cls, "engine_policies", set(self.engine_policies) <= {"streaming", "snapkv", "h2o"},
          f"choose from streaming, snapkv, h2o; got {self.engine_policies!r}")


SMOKE = dict(checkpoint="", files=("textwrap.py",), calibration_file="tarfile.py", length=96, fractions=(0.25, 1.0),
             snapkv_window=8, pool_kernel=3, probe_trials=1, engine_fractions=(0.5,), decode_prompt=48,
             decode_tokens=4, page_size=8, rounds=1, engine_policies=("streaming", "snapkv"))
SMOKE_MODEL = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4, num_kv_heads=2,
                   max_position_embeddings=256, param_dtype="float32", dtype="float32")

CLAIMS = [
    ("StreamingLLM (Xiao et al., 2023)", "4 attention sinks + a window keep perplexity stable over streams of "
     "millions of tokens, while a window alone collapses once the first tokens leave it"),
    ("SnapKV (Li et al., 2024)", "about 3.6x faster generation and 8.2x less memory at 16K tokens, near-lossless "
     "on LongBench"),
]


# ------------------------------------------------------------------------------------------------ setup


def load(s: KVCompressionConfig, seed: int):
  """(model, encode): the checkpoint and its tokenizer, or (smoke) a random float32 model on bytes."""
  if s.checkpoint:
    from jaxinfer.checkpoint.hf import load_hf, load_tokenizer

    tok = load_tokenizer(s.checkpoint)
    return load_hf(s.checkpoint, dtype="float32"), lambda text: tok.encode(text).ids
  from jaxinfer.experiments.quantization import random_model
  from jaxinfer.models.config import ModelConfig

  cfg = ModelConfig(**SMOKE_MODEL)
  return random_model(cfg, seed), lambda text: [b % cfg.vocab_size for b in text.encode()]


def stdlib_text(name: str) -> str:
  from jaxinfer.data.sources import stdlib_root

  return (Path(stdlib_root()) / name).read_text()


# ------------------------------------------------------------------------------------------------ masks


def policy_vis(name, model, tokens, budget, s: KVCompressionConfig, classes, prompt_len):
  """vis [layers, N, kv_heads, N] of a policy at a budget (kept tokens per query and head)."""
  from jaxinfer.engine.kv_policies import reference as R

  cfg = model.config
  n, layers, hkv = len(tokens), cfg.num_layers, cfg.num_kv_heads
  window = max(1, budget - s.sink_tokens)
  if name == "full":
    return R.streaming_visibility(n, layers, hkv, 0, n)
  if name == "streaming":
    return R.streaming_visibility(n, layers, hkv, s.sink_tokens, window)
  if name == "window_only":
    return R.streaming_visibility(n, layers, hkv, 0, budget)
  if name == "duo":
    return R.streaming_visibility(n, layers, hkv, s.sink_tokens, window, [[c == "s" for c in r] for r in classes])
  return snapkv_vis(model, tokens, prompt_len, min(budget, prompt_len), s)


def snapkv_vis(model, tokens, prompt_len, budget, s: KVCompressionConfig):
  """SnapKV's selection (the engine's own device.snapkv_select) on the prompt's dense attention; the continuation
  sees the kept prompt slots and itself."""
  from jaxinfer.engine.kv_policies import device as D
  from jaxinfer.engine.kv_policies import reference as R

  cfg = model.config
  n, g, hkv = len(tokens), cfg.num_heads // cfg.num_kv_heads, cfg.num_kv_heads
  vis = R.streaming_visibility(n, cfg.num_layers, hkv, 0, n).copy()
  w = min(s.snapkv_window, budget - 1, prompt_len - 1)
  if budget >= prompt_len:
    return vis
  probs = R.attention_probs(model, tokens[:prompt_len])  # [layers, heads, q, k]
  for layer in range(cfg.num_layers):
    votes = probs[layer][:, prompt_len - w:].sum(1).reshape(hkv, g, prompt_len).sum(1).T.astype(np.float32)
    keep = np.asarray(D.snapkv_select(votes, None, prompt_len, None, window=w, kernel=s.pool_kernel, keep=budget)).T
    for h in range(hkv):
      row = np.zeros(n, bool)
      row[keep[h]] = True
      row[prompt_len:] = True
      vis[layer, prompt_len:, h] &= row[None, :]
  return vis


def _log_softmax(x):
  m = x.max(-1, keepdims=True)
  return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


# ------------------------------------------------------------------------------------------------ parts


def run_quality(model, texts, s, classes) -> list[dict]:
  from jaxinfer.engine.kv_policies import reference as R

  n = s.length
  half = n // 2
  rows = []
  full = None
  for frac in s.fractions:
    budget = max(s.sink_tokens + 2, int(round(frac * n)))
    row = dict(fraction=frac, budget=budget)
    for name in ("full",) + POLICIES:
      if name == "full" and full is not None:
        row["full"] = full
        continue
      nll = []
      for t in texts:
        lp = _log_softmax(R.masked_logits(model, t, policy_vis(name, model, t, budget, s, classes, half)))
        nll.append(-np.mean([lp[i - 1, t[i]] for i in range(half, len(t))]))
      row[name] = float(np.exp(np.mean(nll)))
      if name == "full":
        full = row["full"]
    rows.append(row)
    print("quality", row, flush=True)
  return rows


def probe_texts(encode, s, rng):
  """(tokens, answer token) per trial: `<name> = <value>` planted at the start of a file, asked at the end."""
  out = []
  names = ["alpha_key", "beta_token", "gamma_id", "delta_ref", "omega_tag", "sigma_val", "kappa_no", "zeta_mark"]
  for i in range(s.probe_trials):
    name, value = names[i % len(names)], f"{rng.integers(100, 999)}"
    head = encode(f"{name} = {value}\n")
    ask = encode(f"\n{name} = ")
    answer = encode(f"{name} = {value}")[len(encode(f"{name} = ")):][:1]
    body = encode(stdlib_text(s.files[i % len(s.files)]))[:s.length - len(head) - len(ask)]
    if answer:
      out.append((head + body + ask, answer[0]))
  return out


def run_probe(model, probes, s, classes) -> list[dict]:
  from jaxinfer.engine.kv_policies import reference as R

  rows = []
  for frac in s.fractions:
    budget = max(s.sink_tokens + 2, int(round(frac * s.length)))
    row = dict(fraction=frac, budget=budget)
    for name in ("full",) + POLICIES:
      hits = [int(R.masked_logits(model, t, policy_vis(name, model, t, budget, s, classes, len(t)))[-1].argmax() == a)
              for t, a in probes]
      row[name] = float(np.mean(hits))
    rows.append(row)
    print("probe", row, flush=True)
  return rows


def run_engine(model, prompt, s, seed) -> list[dict]:
  import jaxinfer
  from jaxinfer.engine.kv_policies import KVPolicyConfig

  cfg = model.config
  total = s.decode_prompt + s.decode_tokens
  page_bytes = 2 * cfg.num_layers * s.page_size * cfg.num_kv_heads * cfg.resolved_head_dim * 4  # float32 pool
  setups = {"none": KVPolicyConfig()}
  for frac in s.engine_fractions:
    budget = max(s.sink_tokens + 2, int(round(frac * s.decode_prompt)))
    w = min(s.snapkv_window, budget // 2)
    made = dict(streaming=KVPolicyConfig(name="streaming", sink_tokens=s.sink_tokens, window=budget - s.sink_tokens),
                snapkv=KVPolicyConfig(name="snapkv", window=w, budget=budget, pool_kernel=s.pool_kernel),
                h2o=KVPolicyConfig(name="h2o", window=w, budget=budget))
    for name in s.engine_policies:
      setups[f"{name}@{frac:g}"] = made[name]
  engines, held = {}, {}
  for key, pol in setups.items():
    engines[key] = jaxinfer.Engine(model, max_batch_size=1, page_size=s.page_size, max_step_tokens=256,
                                   max_model_len=min(cfg.max_position_embeddings, -(-total // 256) * 256),
                                   async_scheduling=False, kv_policy=pol)

  def case(key):
    engine = engines[key]
    state = {}

    def setup():  # prefill (untimed) until the first token is out
      state["rid"] = engine.add_request(prompt, max_new_tokens=s.decode_tokens)
      while not any(o.new_token_ids for o in engine.step()):
        pass

    def fn():
      while engine.has_unfinished():
        engine.step()
      return engine.stats["generated_tokens"]

    def teardown():
      pol = engine.kv_policy
      full = -(-total // s.page_size)
      held[key] = (pol.max_pages[state["rid"]], pol.last_pages[state["rid"]]) if pol is not None else (full, full)

    return Case(fn, setup, teardown)

  comparison = compare({k: case(k) for k in setups}, baseline="none", rounds=s.rounds, warmup=1, repeats=1)
  rows = []
  for key, pol in setups.items():
    t = comparison.time(key)
    rows.append(dict(setup=key, policy=pol.name, budget=pol.budget if pol.name in ("snapkv", "h2o") else (
        pol.sink_tokens + pol.window if pol.name == "streaming" else total),
        decode_tok_s=(s.decode_tokens - 1) / t, vs_none=comparison.time("none") / t,
        kv_bytes_per_token=held[key][1] * page_bytes / total, pages=held[key][1], peak_pages=held[key][0]))
    print("engine", rows[-1], flush=True)
  return rows


# ------------------------------------------------------------------------------------------------ report


def plot(quality, probe):
  plt = results.pyplot()
  fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
  xs = [r["fraction"] for r in quality]
  for name in POLICIES:
    a.plot(xs, [r[name] for r in quality], marker="o", label=name)
    b.plot(xs, [r[name] for r in probe], marker="o", label=name)
  a.axhline(quality[0]["full"], color="k", ls="--", label="full KV")
  b.axhline(probe[-1]["full"], color="k", ls="--", label="full KV")
  for ax in (a, b):
    ax.set_xscale("log")
    ax.set_xlabel("KV budget (fraction of the context)")
    ax.legend(fontsize=8)
  a.set_yscale("log")
  a.set_ylabel("perplexity, second half of each file")
  b.set_ylabel("retrieval probe accuracy")
  return fig


def run(config) -> dict:
  from jaxinfer.engine.kv_policies import duo

  resolve_paths(KVCompressionConfig, config.kv_compression, "kv_compression")
  s = read(config, KVCompressionConfig, SMOKE)
  check(KVCompressionConfig, "checkpoint", not s.checkpoint or (Path(s.checkpoint) / "config.json").is_file(),
        f"{s.checkpoint!r} holds no config.json; train the model first (see experiments/kv_compression.py)")
  logging.getLogger("jaxinfer").setLevel(logging.WARNING)
  model, encode = load(s, config.seed)
  texts = [encode(stdlib_text(f))[:s.length] for f in s.files]
  calib = encode(stdlib_text(s.calibration_file))[:s.length]
  classes = duo.calibrate(model, calib, sink_tokens=s.sink_tokens, window=max(1, s.length // 8 - s.sink_tokens),
                          fraction=s.retrieval_heads)
  with results.open_run(config) as out:
    quality = run_quality(model, texts, s, classes)
    probe = run_probe(model, probe_texts(encode, s, np.random.default_rng(config.seed)), s, classes)
    engine = run_engine(model, (texts[0] * 4)[:s.decode_prompt], s, config.seed)
    for r in quality:
      out.log("quality", **r)
    for r in probe:
      out.log("probe", **r)
    for r in engine:
      out.log("engine", **r)
    cols = [("budget", "fraction", "{:.0%}"), ("kept tokens", "budget", None), ("full KV", "full", ".2f")] + [
        (name, name, ".2f") for name in POLICIES]
    source = s.checkpoint or f"a random {SMOKE_MODEL['num_layers']}-layer model (smoke)"
    out.section("Perplexity against the KV budget",
                f"Model: {source}; files {', '.join(s.files)}, first {s.length} tokens each; perplexity over the "
                f"second half. StreamingLLM: {s.sink_tokens} sinks + window (budget - sinks); window only: the "
                f"budget as a window; SnapKV: the first half compressed at its end (window {s.snapkv_window}, max "
                f"pool {s.pool_kernel}); Duo: heads {classes} (r: retrieval, full KV; s: {s.sink_tokens} sinks + "
                "window), classified by long-range attention mass on " + s.calibration_file + ".",
                results.table_from(quality, cols))
    out.section("Retrieval probe (accuracy)", f"{len(probe_texts(encode, s, np.random.default_rng(config.seed)))} "
                "probes: `<name> = <value>` planted at the start, asked at the end of a file.",
                results.table_from(probe, [c for c in cols]))
    out.section("Engine decode and KV bytes",
                f"jaxinfer.Engine, one request of {s.decode_prompt} prompt tokens + {s.decode_tokens} new ones, "
                "greedy; decode tokens/s after prefill, ratio to the engine without a policy in the same run; KV "
                "bytes per token = pages held after the last step x page bytes / tokens (float32 pool); peak pages: the most "
                "held at once (SnapKV and H2O hold the whole prompt until it ends, plus the compaction's copy).",
                results.table_from(engine, [("setup", "setup", None), ("kept tokens", "budget", None),
                                            ("decode tok/s", "decode_tok_s", ".1f"), ("vs none", "vs_none", "{:.2f}x"),
                                            ("pages", "pages", None), ("peak pages", "peak_pages", None),
                                            ("KV bytes / token", "kv_bytes_per_token", ".0f")]))
    out.section("Against the papers' claims", "\n".join(f"- {who}: {claim}" for who, claim in CLAIMS))
    out.figure(plot(quality, probe), "kv_compression.png", dpi=110)
    print(out.markdown)
  return dict(quality=quality, probe=probe, engine=engine)
