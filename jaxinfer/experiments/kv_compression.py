"""Driver: KV-cache eviction policies on a model trained by the quickstart recipe at a 1K context: perplexity
on long stdlib files and a copy-style retrieval probe against the KV budget, for each policy and KV dtype, the
window-only ablation, KV bytes per token and engine decode speed at each budget (H2O's scoring cost isolated),
set beside StreamingLLM's, SnapKV's and KIVI / KVQuant's claims.

Config: experiments/kv_compression.py (section `kv_compression`, KVCompressionConfig below).

Parts:
  quality   teacher forcing through the dense references (jaxinfer/engine/kv_policies/reference.py and
            h2o_reference.py, which the engine is tested against): for each KV dtype (kv_dtypes: the keys and
            values as a pool of that dtype gives them back; int8 / fp8 per token, kv_quant.roundtrip) and budget
            (a fraction of `length`), mean NLL over the second half of each file under full KV, StreamingLLM
            (sinks + window), window only, SnapKV and H2O (the first half is the prompt, compressed to the budget
            at its end; H2O then evicts during the second half as in decode) and Duo (heads calibrated on another
            file, retrieval_heads of them full, the rest sinks + window).
  probe     copy-style retrieval: a line `<name> = <value>` inserted at a line break early in a real stdlib
            file (after the first probe_offset characters), the file, then `\n<name> =`; <value> is one token
            drawn from probe_candidates single-token values. Scored at the row after ` =` (a decode row for SnapKV
            and H2O, whose prompt ends with the name: the question is in SnapKV's observation window): hit when
            the right value has the highest logit among the candidates (chance 1 / probe_candidates), and greedy
            (top-1 over the whole vocabulary). It measures whether the model copies a value from ~`length`
            tokens back, i.e. whether the kept KV still holds the planted line and the model can use it.
  engine    jaxinfer.Engine with each policy at each of engine_fractions (and, for engine_kv_dtype, the same on a
            quantized pool): a decode_prompt-token prompt then decode_tokens new tokens, timed (median of rounds;
            ratio to the no-policy engine in the same run); KV bytes per token = pages the request held at the
            end x page bytes / its tokens. "h2o_unscored" is H2O with its attention-mass scoring off on the same
            page-table width (kv_policies/h2o_unscored.py): h2o / h2o_unscored is the scoring's own cost.
            "h2o_wide" is H2O without its narrow decode table (kv_policies/h2o_wide.py: every step reads the
            whole prompt's page-table width): h2o / h2o_wide is what reading only the budget's pages gains.
            "duo" is the realised Duo layout (retrieval heads paged, streaming heads in a sinks + window store,
            kv_policies/duo_store.py), "duo_masked" the one-pool masked layout, both with the calibrated heads
            and window = budget - sinks: KV bytes per token there are measured from the pool (bytes per page x
            pages held, plus the store's fixed bytes, over the tokens), and "fit pages" is how many pages the
            no-policy pool's bytes buy under the policy (engine.kv_cache_bytes, the engine's own sizing).
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

POLICIES = ("streaming", "window_only", "snapkv", "h2o", "duo")
ENGINE_POLICIES = ("streaming", "snapkv", "h2o", "h2o_unscored", "h2o_wide", "duo", "duo_masked")


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
  probe_trials: int = 20
  engine_fractions: tuple[float, ...] = (0.1, 0.5)
  engine_policies: tuple[str, ...] = ("streaming", "snapkv", "h2o", "h2o_wide", "h2o_unscored", "duo", "duo_masked")
  decode_prompt: int = 768
  decode_tokens: int = 32
  page_size: int = 16
  rounds: int = 2
  kv_dtypes: tuple[str, ...] = ("float32", "bfloat16", "int8", "float8_e4m3fn")  # the quality part
  probe_kv_dtypes: tuple[str, ...] = ("float32", "int8")
  probe_fractions: tuple[float, ...] = ()  # empty: fractions
  parts: tuple[str, ...] = ("quality", "probe", "engine")
  probe_candidates: int = 8
  probe_offset: int = 300
  engine_kv_dtype: str = "int8"  # engine_kv_policies again on this pool at engine_fractions[0] ("": not)
  engine_kv_policies: tuple[str, ...] = ("streaming", "snapkv", "h2o")

  def __post_init__(self):
    cls = type(self)
    for name in ("length", "sink_tokens", "snapkv_window", "pool_kernel", "probe_trials", "decode_prompt",
                 "decode_tokens", "page_size", "rounds", "probe_candidates", "probe_offset"):
      value = getattr(self, name)
      check(cls, name, isinstance(value, int) and value >= 1, f"must be a positive integer, got {value!r}")
    for name in ("fractions", "engine_fractions") + (("probe_fractions",) if self.probe_fractions else ()):
      value = getattr(self, name)
      check(cls, name, bool(value) and all(0 < f <= 1 for f in value), f"fractions in (0, 1], got {value!r}")
    check(cls, "files", bool(self.files), "name at least one stdlib file")
    check(cls, "engine_policies", set(self.engine_policies) <= set(ENGINE_POLICIES),
          f"choose from {', '.join(ENGINE_POLICIES)}; got {self.engine_policies!r}")
    check(cls, "engine_kv_policies", set(self.engine_kv_policies) <= set(self.engine_policies),
          f"a subset of engine_policies {self.engine_policies!r}; got {self.engine_kv_policies!r}")
    check(cls, "parts", bool(self.parts) and set(self.parts) <= {"quality", "probe", "engine"},
          f"a non-empty subset of quality, probe, engine; got {self.parts!r}")
    check(cls, "probe_candidates", self.probe_candidates >= 2, f"at least 2, got {self.probe_candidates}")
    dtypes = ("float32", "bfloat16", "int8", "float8_e4m3fn")
    for name in ("kv_dtypes", "probe_kv_dtypes"):
      value = getattr(self, name)
      check(cls, name, bool(value) and set(value) <= set(dtypes), f"choose from {dtypes}; got {value!r}")
    check(cls, "engine_kv_dtype", self.engine_kv_dtype in ("", "int8", "float8_e4m3fn"),
          f"'', 'int8' or 'float8_e4m3fn'; got {self.engine_kv_dtype!r}")


SMOKE = dict(checkpoint="", files=("textwrap.py",), calibration_file="tarfile.py", length=96, fractions=(0.25, 1.0),
             snapkv_window=8, pool_kernel=3, probe_trials=1, engine_fractions=(0.5,), decode_prompt=48,
             decode_tokens=4, page_size=8, rounds=1, engine_policies=("h2o_unscored",),
             engine_kv_dtype="", engine_kv_policies=(),
             kv_dtypes=("int8",), probe_kv_dtypes=("int8",), probe_candidates=4, probe_offset=40)
SMOKE_MODEL = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4, num_kv_heads=2,
                   max_position_embeddings=256, param_dtype="float32", dtype="float32")

CLAIMS = [
    ("StreamingLLM (Xiao et al., 2023)", "4 attention sinks + a window keep perplexity stable over streams of "
     "millions of tokens, while a window alone collapses once the first tokens leave it"),
    ("SnapKV (Li et al., 2024)", "about 3.6x faster generation and 8.2x less memory at 16K tokens, near-lossless "
     "on LongBench"),
    ("H2O (Zhang et al., 2023)", "heavy hitters + recent tokens at 20% of the KV keep quality close to full KV"),
    ("DuoAttention (Xiao et al., 2024)", "full KV for retrieval heads only, sinks + window for streaming heads: up "
     "to 1.67x less memory and 1.50x faster decode for GQA models"),
    ("KIVI (Liu et al., 2024) / KVQuant (Hooper et al., 2024)", "2-4-bit KV (keys per channel, values per token) "
     "with a small perplexity loss; 8-bit is near-lossless"),
]


# ------------------------------------------------------------------------------------------------ setup


def load(s: KVCompressionConfig, seed: int):
  """(model, encode, decode): the checkpoint and its tokenizer, or (smoke) a random float32 model on bytes."""
  if s.checkpoint:
    from jaxinfer.checkpoint.hf import load_hf, load_tokenizer

    tok = load_tokenizer(s.checkpoint)
    return load_hf(s.checkpoint, dtype="float32"), lambda text: tok.encode(text).ids, tok.decode
  from jaxinfer.experiments.quantization import random_model
  from jaxinfer.models.config import ModelConfig

  cfg = ModelConfig(**SMOKE_MODEL)
  return (random_model(cfg, seed), lambda text: [b % cfg.vocab_size for b in text.encode()],
          lambda ids: bytes(ids).decode("latin-1"))


def stdlib_text(name: str) -> str:
  from jaxinfer.data.sources import stdlib_root

  return (Path(stdlib_root()) / name).read_text()


# ------------------------------------------------------------------------------------------------ masks


def policy_logits(name, model, tokens, budget, s: KVCompressionConfig, classes, prompt_len, kv_dtype):
  """[N, vocab] teacher-forced logits of a policy at a budget (kept tokens per query and head), the KV as a pool
  of kv_dtype gives it back."""
  from jaxinfer.engine.kv_policies import reference as R
  from jaxinfer.engine.kv_policies.h2o_reference import h2o_logits

  quant = None if kv_dtype == "float32" else kv_dtype  # the experiment's model runs in float32
  if name == "h2o":
    return h2o_logits(model, tokens, prompt_len=prompt_len, budget=budget, window=min(s.snapkv_window, budget // 2),
                      quant_dtype=quant)
  cfg = model.config
  n, layers, hkv = len(tokens), cfg.num_layers, cfg.num_kv_heads
  window = max(1, budget - s.sink_tokens)
  if name == "full":
    vis = R.streaming_visibility(n, layers, hkv, 0, n)
  elif name == "streaming":
    vis = R.streaming_visibility(n, layers, hkv, s.sink_tokens, window)
  elif name == "window_only":
    vis = R.streaming_visibility(n, layers, hkv, 0, budget)
  elif name == "duo":
    vis = R.streaming_visibility(n, layers, hkv, s.sink_tokens, window, [[c == "s" for c in r] for r in classes])
  else:
    vis = snapkv_vis(model, tokens, prompt_len, min(budget, prompt_len), s, quant)
  return R.masked_logits(model, tokens, vis, quant_dtype=quant)


_PROMPT_PROBS: dict = {}


def snapkv_vis(model, tokens, prompt_len, budget, s: KVCompressionConfig, quant=None):
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
  key = (tuple(tokens[:prompt_len]), quant)
  if key not in _PROMPT_PROBS:  # every budget selects from the same prompt attention
    _PROMPT_PROBS.clear()
    _PROMPT_PROBS[key] = R.attention_probs(model, tokens[:prompt_len], quant_dtype=quant)  # [layers, heads, q, k]
  probs = _PROMPT_PROBS[key]
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


def budget_of(frac, n, s):
  return max(s.sink_tokens + 2, int(round(frac * n)))


def run_quality(model, texts, s, classes) -> list[dict]:
  n = s.length
  half = n // 2
  nll = {}  # (kv_dtype, fraction, policy) -> per-text mean NLL; texts outermost (SnapKV's prompt attention cached)
  for t in texts:
    for kv_dtype in s.kv_dtypes:
      for frac in s.fractions:
        for name in ("full",) + POLICIES:
          if name == "full" and frac != s.fractions[0]:
            continue
          lp = _log_softmax(policy_logits(name, model, t, budget_of(frac, n, s), s, classes, half, kv_dtype))
          nll.setdefault((kv_dtype, frac, name), []).append(-np.mean([lp[i - 1, t[i]] for i in range(half, len(t))]))
      print("quality", kv_dtype, "done for a file", flush=True)
  rows = []
  for kv_dtype in s.kv_dtypes:
    for frac in s.fractions:
      row = dict(kv_dtype=kv_dtype, fraction=frac, budget=budget_of(frac, n, s),
                 full=float(np.exp(np.mean(nll[kv_dtype, s.fractions[0], "full"]))))
      row.update({name: float(np.exp(np.mean(nll[kv_dtype, frac, name]))) for name in POLICIES})
      rows.append(row)
      print("quality", row, flush=True)
  return rows


def probe_candidates(encode, decode, vocab_size: int, ask: list[int]) -> list[int]:
  """Tokens t such that `ask` + decode(t) tokenizes as ask + [t]: single-token values (a space and a word or
  number) that the probe can score from one forward."""
  out = []
  for t in range(vocab_size):
    text = decode([t])
    body = text[1:]
    if len(text) >= 3 and text[0] == " " and (body.isdigit() or (body.isalpha() and body.islower())):
      if encode(decode(ask) + text) == ask + [t]:
        out.append(t)
  return out


PROBE_WORDS = ("amber", "basalt", "cobalt", "dune", "ember", "fjord", "garnet", "harbor", "iris", "juniper",
               "kestrel", "lagoon", "marble", "nectar", "onyx", "pepper", "quartz", "raven", "saffron", "tundra")


def probe_texts(encode, decode, vocab_size, s, rng):
  """Per trial (tokens, right value token, candidate tokens): `<name> = <value>` inserted at the first line break
  after probe_offset characters of a stdlib file, the file cut so that `\n<name> =` + value ends at `length`."""
  out = []
  for i in range(s.probe_trials):
    name = f"{PROBE_WORDS[rng.integers(len(PROBE_WORDS))]}_{PROBE_WORDS[rng.integers(len(PROBE_WORDS))]}_{i}"
    ask = encode(f"\n{name} =")
    text = stdlib_text(s.files[i % len(s.files)])
    cut = text.index("\n", min(s.probe_offset, len(text) - 1)) + 1
    room = s.length - len(ask) - 1
    seen = set(encode(text)[:2 * room])  # candidates never in the text: only the planted line holds the value
    pool = probe_candidates(encode, decode, vocab_size, ask) if vocab_size > 256 else list(range(160, 256))
    pool = [c for c in pool if c not in seen]
    if len(pool) < s.probe_candidates:
      raise ValueError(f"kv_compression.probe_candidates: only {len(pool)} single-token values absent from "
                       f"{s.files[i % len(s.files)]}, fewer than probe_candidates={s.probe_candidates}")
    cands = [int(c) for c in rng.choice(pool, size=s.probe_candidates, replace=False)]
    value = cands[0]
    before, after = encode(text[:cut]), encode(f"{name} =" + decode([value]) + "\n" + text[cut:])
    body = (before + after)[:room]
    out.append((body + ask + [value], value, sorted(cands)))
  return out


def run_probe(model, probes, s, classes) -> list[dict]:
  fractions = s.probe_fractions or s.fractions
  hits = {}  # (kv_dtype, fraction, policy) -> [(candidate hit, greedy hit)] over probes
  for t, value, cands in probes:
    for kv_dtype in s.probe_kv_dtypes:
      full = None
      for frac in fractions:
        budget = budget_of(frac, s.length, s)
        for name in ("full",) + POLICIES:
          if full is not None and (name == "full" or budget >= len(t)):
            hit = full  # full KV once; a budget holding the whole probe evicts nothing (the quality part checks)
          else:
            # the prompt ends with the name (the question); ` =` and the value are decode rows
            logits = policy_logits(name, model, t, budget, s, classes, len(t) - 2, kv_dtype)[-2]
            hit = (int(cands[int(np.argmax(logits[cands]))] == value), int(np.argmax(logits) == value))
            full = hit if name == "full" else full
          hits.setdefault((kv_dtype, frac, name), []).append(hit)
  rows = []
  for kv_dtype in s.probe_kv_dtypes:
    for frac in fractions:
      row = dict(kv_dtype=kv_dtype, fraction=frac, budget=budget_of(frac, s.length, s))
      for name in ("full",) + POLICIES:
        h = np.asarray(hits[kv_dtype, frac, name], float)
        row[name], row[name + "_greedy"] = float(h[:, 0].mean()), float(h[:, 1].mean())
      rows.append(row)
      print("probe", row, flush=True)
  return rows


def run_engine(model, prompt, s, seed, classes=()) -> list[dict]:
  import jaxinfer
  from jaxinfer.engine.kv_policies import KVPolicyConfig

  cfg = model.config
  total = s.decode_prompt + s.decode_tokens
  setups = {"none": (KVPolicyConfig(), None)}
  for frac in s.engine_fractions:
    budget = max(s.sink_tokens + 2, int(round(frac * s.decode_prompt)))
    w = min(s.snapkv_window, budget // 2)
    made = dict(streaming=KVPolicyConfig(name="streaming", sink_tokens=s.sink_tokens, window=budget - s.sink_tokens),
                snapkv=KVPolicyConfig(name="snapkv", window=w, budget=budget, pool_kernel=s.pool_kernel),
                h2o=KVPolicyConfig(name="h2o", window=w, budget=budget),
                h2o_unscored=KVPolicyConfig(name="h2o_unscored", window=w, budget=budget),
                h2o_wide=KVPolicyConfig(name="h2o_wide", window=w, budget=budget),
                **{name: KVPolicyConfig(name=name, sink_tokens=s.sink_tokens, window=budget - s.sink_tokens,
                                        head_classes=classes) for name in ("duo", "duo_masked")})
    for name in s.engine_policies:
      setups[f"{name}@{frac:g}"] = (made[name], None)
      if s.engine_kv_dtype and frac == s.engine_fractions[0] and name in s.engine_kv_policies:
        setups[f"{name}@{frac:g} {s.engine_kv_dtype}"] = (made[name], s.engine_kv_dtype)
  if s.engine_kv_dtype:
    setups[f"none {s.engine_kv_dtype}"] = (KVPolicyConfig(), s.engine_kv_dtype)
  engines, held = {}, {}
  for key, (pol, kv_dtype) in setups.items():
    # room for a compaction's copy beside the whole prompt (else SnapKV / H2O defer it: counted below)
    engines[key] = jaxinfer.Engine(model, max_batch_size=1, page_size=s.page_size, max_step_tokens=256,
                                   max_model_len=min(cfg.max_position_embeddings, -(-total // 256) * 256),
                                   num_pages=2 * -(-total // s.page_size) + 2, async_scheduling=False,
                                   kv_policy=pol, kv_cache_dtype=kv_dtype)

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
      pool = engine.runner.pool  # bytes measured from the pool: a page's, and a fixed store's (duo)
      extra = (pool.nbytes // pool.num_pages, getattr(pool.policy, "nbytes", 0) if pol and pol.name == "duo" else 0)
      held[key] = ((pol.max_pages[state["rid"]], pol.last_pages[state["rid"]], pol.stats["deferred_compactions"])
                   if pol is not None else (full, full, 0)) + (engine.stats["narrow_table_steps"],) + extra

    return Case(fn, setup, teardown)

  comparison = compare({k: case(k) for k in setups}, baseline="none", rounds=s.rounds, warmup=1, repeats=1)
  rows = []
  none_bytes = engines["none"].runner.pool.nbytes
  for key, (pol, kv_dtype) in setups.items():
    t = comparison.time(key)
    per_page, store = held[key][4:6]  # measured from the engine's pool (scales included)
    rows.append(dict(setup=key, policy=pol.name, kv_dtype=kv_dtype or "float32",
                     budget=pol.budget if pol.name in ("snapkv", "h2o", "h2o_unscored", "h2o_wide") else (
                         pol.sink_tokens + pol.window if pol.name in ("streaming", "duo", "duo_masked") else total),
                     decode_tok_s=(s.decode_tokens - 1) / t, vs_none=comparison.time("none") / t,
                     kv_bytes_per_token=(held[key][1] * per_page + store) / total, pages=held[key][1],
                     peak_pages=held[key][0], deferred_compactions=held[key][2], narrow_steps=held[key][3],
                     page_bytes=per_page, store_bytes=store,
                     fit_pages=pages_that_fit(engines[key].engine_config, cfg, pol, none_bytes)))
    print("engine", rows[-1], flush=True)
  return rows


def pages_that_fit(engine_config, model_config, policy, nbytes: int) -> int:
  """Pages the engine would size from kv_cache_bytes=nbytes under this policy (its own sizing path)."""
  import dataclasses

  from jaxinfer.engine.kv_policies.budget import policy_budget

  ec = dataclasses.replace(engine_config, num_pages=None, kv_cache_bytes=nbytes, kv_policy=policy)
  return policy_budget(ec, model_config).resolve(model_config).num_pages


# ------------------------------------------------------------------------------------------------ report


def plot(quality, probe, kv_dtypes, probe_kv_dtypes, chance):
  plt = results.pyplot()
  fig, axes = plt.subplots(1, len(kv_dtypes) + 1, figsize=(4.2 * (len(kv_dtypes) + 1), 4))
  for ax, kv_dtype in zip(axes, kv_dtypes):
    rows = [r for r in quality if r["kv_dtype"] == kv_dtype]
    xs = [r["fraction"] for r in rows]
    for name in POLICIES:
      ax.plot(xs, [r[name] for r in rows], marker="o", label=name)
    ax.axhline(rows[0]["full"], color="k", ls="--", label="full KV")
    ax.set_title(f"perplexity, KV {kv_dtype}")
    ax.set_yscale("log")
  b = axes[-1]
  for i, kv_dtype in enumerate(probe_kv_dtypes[:2]):
    rows = [r for r in probe if r["kv_dtype"] == kv_dtype]
    for c, name in enumerate(POLICIES):
      b.plot([r["fraction"] for r in rows], [r[name] for r in rows], marker="o", color=f"C{c}",
             ls="-" if i == 0 else ":", label=name if i == 0 else None)
    b.axhline(rows[-1]["full"], color="k", ls="--" if i == 0 else ":", label=f"full KV ({kv_dtype})")
  b.axhline(chance, color="grey", ls="-.", label="chance")
  b.set_title("retrieval probe, KV " + ", ".join(f"{d} ({ls})" for d, ls in zip(probe_kv_dtypes, ("solid", "dotted"))))
  b.set_ylabel("accuracy among the candidates")
  for ax in axes:
    ax.set_xscale("log")
    ax.set_xlabel("KV budget (fraction of the context)")
    ax.legend(fontsize=7)
  fig.tight_layout()
  return fig


def run(config) -> dict:
  from jaxinfer.engine.kv_policies import duo

  resolve_paths(KVCompressionConfig, config.kv_compression, "kv_compression")
  s = read(config, KVCompressionConfig, SMOKE)
  check(KVCompressionConfig, "checkpoint", not s.checkpoint or (Path(s.checkpoint) / "config.json").is_file(),
        f"{s.checkpoint!r} holds no config.json; train the model first (see experiments/kv_compression.py)")
  logging.getLogger("jaxinfer").setLevel(logging.WARNING)
  model, encode, decode = load(s, config.seed)
  texts = [encode(stdlib_text(f))[:s.length] for f in s.files]
  calib = encode(stdlib_text(s.calibration_file))[:s.length]
  classes = duo.calibrate(model, calib, sink_tokens=s.sink_tokens, window=max(1, s.length // 8 - s.sink_tokens),
                          fraction=s.retrieval_heads)
  with results.open_run(config) as out:
    quality = run_quality(model, texts, s, classes) if "quality" in s.parts else []
    probes = probe_texts(encode, decode, model.config.vocab_size, s, np.random.default_rng(config.seed))
    probe = run_probe(model, probes, s, classes) if "probe" in s.parts else []
    engine = (run_engine(model, (texts[0] * 4)[:s.decode_prompt], s, config.seed, classes)
              if "engine" in s.parts else [])
    for r in quality:
      out.log("quality", **r)
    for r in probe:
      out.log("probe", **r)
    for r in engine:
      out.log("engine", **r)
    cols = [("KV dtype", "kv_dtype", None), ("budget", "fraction", "{:.0%}"), ("kept tokens", "budget", None),
            ("full KV", "full", ".2f")] + [(name, name, ".2f") for name in POLICIES]
    source = s.checkpoint or f"a random {SMOKE_MODEL['num_layers']}-layer model (smoke)"
    if quality:
      out.section("Perplexity against the KV budget",
                  f"Model: {source}; files {', '.join(s.files)}, first {s.length} tokens each; perplexity over the "
                  f"second half. StreamingLLM: {s.sink_tokens} sinks + window (budget - sinks); window only: the "
                  f"budget as a window; SnapKV: the first half compressed at its end (window {s.snapkv_window}, max "
                  f"pool {s.pool_kernel}); H2O: the first half cut to the budget at its end (recent window "
                  f"min({s.snapkv_window}, budget / 2)), then one eviction per token of the second half; Duo: heads "
                  f"{classes} (r: retrieval, full KV; s: {s.sink_tokens} sinks + window), classified by long-range "
                  f"attention mass on {s.calibration_file}. KV dtype: keys and values as a pool of that dtype gives "
                  "them back (int8 / float8_e4m3fn: absmax scale per token and kv head, for keys and values).",
                  results.table_from(quality, cols))
    chance = 1.0 / s.probe_candidates
    if probe:
      out.section("Retrieval probe (accuracy)",
                  f"{len(probes)} probes: `<name> = <value>` inserted at a line break after {s.probe_offset} "
                  f"characters of a stdlib file, the file up to {s.length} tokens, then `\\n<name> =`; hit: the right "
                  f"value has the highest logit among {s.probe_candidates} single-token candidates (chance "
                  f"{chance:.3f}). SnapKV / H2O: the prompt ends with the name, ` =` is a decode row.",
                  results.table_from(probe, cols),
                  "Greedy (the right value is the argmax over the whole vocabulary):",
                  results.table_from(probe, cols[:3] + [(n, n + "_greedy", ".2f") for n in ("full",) + POLICIES]))
    if engine:
      out.section("Engine decode and KV bytes",
                  f"jaxinfer.Engine, one request of {s.decode_prompt} prompt tokens + {s.decode_tokens} new ones, "
                  "greedy; decode tokens/s after prefill, ratio to the engine without a policy (float32 pool) in the "
                  "same run; KV bytes per token = pages held after the last step x page bytes (scales included; "
                  "both read from the engine's pool) / tokens, plus duo's fixed streaming-head store / tokens; "
                  f"duo / duo_masked: heads {classes}, realised (retrieval heads paged, streaming heads in a "
                  "sinks + window store) / masked in one pool; fit pages: pages the no-policy pool's bytes buy "
                  "under the policy (engine.kv_cache_bytes); "
                  "peak pages: the most held at once (SnapKV and H2O hold the whole prompt until it ends, "
                  "plus the compaction's copy). h2o / h2o_unscored at the same budget: the attention-mass "
                  "scoring's own cost (same page-table width, same eviction programs); h2o / h2o_wide: the gain "
                  "of the narrow decode table (H2O's steps read ceil(budget / page_size) + 2 pages once every "
                  "request is within that; h2o_wide: the whole prompt's width); narrow steps: steps run on it "
                  "(summed over every warm-up and timed run of the rounds).",
                  results.table_from(engine, [("setup", "setup", None), ("kept tokens", "budget", None),
                                              ("decode tok/s", "decode_tok_s", ".1f"),
                                              ("vs none", "vs_none", "{:.2f}x"),
                                              ("pages", "pages", None), ("peak pages", "peak_pages", None),
                                              ("deferred compactions", "deferred_compactions", None),
                                              ("narrow steps", "narrow_steps", None),
                                              ("KV bytes / token", "kv_bytes_per_token", ".0f"),
                                              ("fit pages", "fit_pages", None)]))
    out.section("Against the papers' claims", "\n".join(f"- {who}: {claim}" for who, claim in CLAIMS))
    if quality and probe:
      out.figure(plot(quality, probe, s.kv_dtypes, s.probe_kv_dtypes, chance), "kv_compression.png", dpi=110)
    print(out.markdown)
  return dict(quality=quality, probe=probe, engine=engine)
