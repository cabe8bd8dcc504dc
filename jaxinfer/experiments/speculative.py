"""Driver: speculative decoding in the engine, every method beside plain decoding on the same target.

Config: experiments/speculative.py (section `speculative`: the dataclass below; `model` for the smoke run's
random models). For each batch size (1 and 8 by default) the same prompts are served by
  plain        jaxinfer.Engine without speculation (the baseline, same run)
  ngram k      prompt lookup with k = num_speculative_tokens, for each k of `ks`
  draft k      the draft model (4-8x cheaper, trained on the same tokens), for each k
  medusa tree  Medusa-1 heads trained on the target (`jaxinfer train --config experiments/medusa.py`), for
               each candidate tree of `trees` (k = its nodes: chains of 1..4 heads' top guess, and trees)
  * adaptive   each method with per-sequence adaptive k (up to max(ks)) when `adaptive`
and each row reports the acceptance rate (accepted / drafted), mean tokens per verification (what a verifying
sequence gains in one target forward: accepted + 1), target forwards per generated token (engine steps per
token of one sequence) and tokens/s as a ratio to plain decoding at the same batch (each engine runs once to
compile, then once timed; interleaved over `rounds`, the best kept).

Claims set beside (wall-clock speedups on GPUs, 7B+ targets): Medusa 2.2-3.6x, draft-model speculative sampling
2-2.5x (Leviathan et al.; Chen et al.), BASS 2.15x at batch 8.
"""

from __future__ import annotations

import dataclasses
import inspect
import time

import numpy as np

from jaxinfer.config.schema import path_field
from jaxinfer.engine.speculative.tree import tree_paths
from jaxinfer.experiments import results
from jaxinfer.experiments.sections import check, read

CLAIMS = "Medusa 2.2-3.6x; draft-model speculative sampling 2-2.5x; BASS 2.15x at batch 8 (GPU wall-clock speedups)"


@dataclasses.dataclass(frozen=True)
class SpeculativeRunConfig:
  SECTION = "speculative"
  target: str = path_field("results/quickstart/hf")  # HF dir (quickstart recipe); "": random `model` (smoke)
  draft: str = path_field("results/speculative_draft/hf")  # HF dir, same tokenizer; "": random 1-layer model
  methods: tuple = ("ngram", "draft", "medusa")
  ks: tuple = (1, 3)  # num_speculative_tokens swept (ngram, draft)
  medusa_heads: str = path_field("results/quickstart/hf")  # the heads' directory; "": untrained heads (smoke)
  trees: tuple = ((1,), (1, 1), (1, 1, 1), (3, 2))  # medusa: candidate trees swept (k = their nodes)
  adaptive: bool = True  # also each method with adaptive k up to max(ks)
  batches: tuple = (1, 8)
  prompt_tokens: int = 96
  max_new_tokens: int = 32
  temperature: float = 0.0
  rounds: int = 2

  def __post_init__(self):
    check(type(self), "methods", bool(self.methods) and set(self.methods) <= {"ngram", "draft", "medusa"},
          f"must be a non-empty subset of ('ngram', 'draft', 'medusa'), got {self.methods}")
    check(type(self), "trees", "medusa" not in self.methods or bool(self.trees), "medusa needs at least one tree")
    for name in ("ks", "batches"):
      value = getattr(self, name)
      check(type(self), name, bool(value) and all(isinstance(x, int) and x >= 1 for x in value),
            f"need positive integers, got {value}")
    for name in ("prompt_tokens", "max_new_tokens", "rounds"):
      check(type(self), name, getattr(self, name) >= 1, f"must be >= 1, got {getattr(self, name)}")


SMOKE = dict(target="", draft="", medusa_heads="", trees=((2,),), ks=(2,), batches=(2,), prompt_tokens=12,
             max_new_tokens=6, adaptive=False)
SMOKE_MODEL = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
                   num_kv_heads=2, max_position_embeddings=128, initializer_range=0.2)


# ------------------------------------------------------------------------------------------------ models


def _models(s: SpeculativeRunConfig, model_cfg, seed: int):
  """(target, draft, Medusa heads or None, prompt token lists source) from the HF dirs, or random models for
  the smoke run."""
  import jaxinfer

  if s.target:
    target = jaxinfer.load_hf(s.target, dtype="float32")
    check(type(s), "draft", bool(s.draft), "a trained target needs a trained draft (an HF directory)")
    draft = jaxinfer.load_hf(s.draft, dtype="float32")
    tokenizer = jaxinfer.load_tokenizer(s.target)
  else:
    target = jaxinfer.init_model(model_cfg, seed=seed)
    draft = jaxinfer.init_model(dataclasses.replace(model_cfg, num_layers=1), seed=seed + 1)
    tokenizer = None
  return target, draft, _heads(s, target, seed), tokenizer


def _heads(s: SpeculativeRunConfig, target, seed: int):
  """The trained heads, or (smoke, medusa_heads="") untrained ones: copies of the lm_head."""
  if "medusa" not in s.methods:
    return None
  from flax import nnx

  from jaxinfer.models.medusa import MedusaConfig, MedusaHeads, load_medusa_heads

  if s.medusa_heads:
    return load_medusa_heads(s.medusa_heads, target.config)
  depth = max(len(tree_paths(t)[-1]) for t in s.trees)
  heads = MedusaHeads(MedusaConfig.for_model(target.config, num_heads=depth), rngs=nnx.Rngs(seed))
  heads.init_from_base(target)
  return heads


def _prompts(s: SpeculativeRunConfig, tokenizer, vocab: int, n: int, seed: int) -> list[list[int]]:
  """n prompts of prompt_tokens tokens: stretches of the standard library's source (code: the quickstart
  model's domain) when there is a tokenizer, else random tokens with repeats."""
  rng = np.random.default_rng(seed)
  if tokenizer is None:
    out = []
    for _ in range(n):
      unit = rng.integers(0, vocab, size=int(rng.integers(3, 8))).tolist()
      out.append((unit * s.prompt_tokens)[:s.prompt_tokens])
    return out
  import collections, json, textwrap, argparse, dataclasses as dc, functools, logging  # noqa: E401

  texts = [inspect.getsource(m) for m in (collections, json, textwrap, argparse, dc, functools, logging)]
  ids = [tokenizer.encode(t).ids for t in texts]
  out = []
  for i in range(n):
    doc = ids[i % len(ids)]
    start = int(rng.integers(0, max(1, len(doc) - s.prompt_tokens)))
    out.append(doc[start:start + s.prompt_tokens])
  return out


# ------------------------------------------------------------------------------------------------ measure


def _engine(target, batch: int, spec, max_rows: int, max_len: int):
  from jaxinfer.engine import Engine

  # the same max_rows_per_seq for every engine of a batch size: their step programs are shared
  return Engine(target, max_batch_size=batch, min_seq_bucket=batch, page_size=16, max_model_len=max_len,
                max_step_tokens=max(64, batch * max_rows), max_rows_per_seq=max_rows, speculative=spec)


def _measure(target, prompts, s, batch, spec, max_rows, max_len, warm: bool):
  """(stats of the timed run, seconds, tokens): a run to compile (first round only), then the timed run on a
  fresh engine (engines of one model share compiled programs)."""
  import jaxinfer

  sampling = jaxinfer.SamplingParams(temperature=s.temperature, seed=0)
  if warm:
    _engine(target, batch, spec, max_rows, max_len).run(prompts, sampling, s.max_new_tokens, progress=False)
  engine = _engine(target, batch, spec, max_rows, max_len)
  start = time.perf_counter()
  outs = engine.run(prompts, sampling, s.max_new_tokens, progress=False)
  seconds = time.perf_counter() - start
  draft_steps = getattr(getattr(engine.scheduler.proposer, "inner", engine.scheduler.proposer), "draft_steps", 0)
  return dict(engine.stats, draft_steps=draft_steps), seconds, outs


def _cases(s: SpeculativeRunConfig, draft, heads):
  import jaxinfer

  for method in s.methods:
    if method == "medusa":
      for tree in s.trees:
        k = len(tree_paths(tree))
        yield f"medusa {_tree_name(tree)}", k, False, jaxinfer.SpeculativeConfig(
            method="medusa", num_speculative_tokens=k, medusa_heads=heads, tree=tuple(tree))
      continue
    extra = dict(draft_model=draft) if method == "draft" else {}
    for k in s.ks:
      yield f"{method}", k, False, jaxinfer.SpeculativeConfig(method=method, num_speculative_tokens=k, **extra)
    if s.adaptive:
      yield f"{method}", max(s.ks), True, jaxinfer.SpeculativeConfig(
          method=method, num_speculative_tokens=max(s.ks), adaptive=True, **extra)


def _is_chain(method: str) -> bool:
  """ngram / draft rows, and Medusa trees with one guess per head ("medusa 1x1x1")."""
  parts = method.split()
  return parts[0] != "medusa" or set(parts[1].split("x")) == {"1"}


def _tree_name(tree) -> str:
  return "x".join(str(t) for t in tree) if all(isinstance(t, int) for t in tree) else f"{len(tree)} paths"


def measure(s: SpeculativeRunConfig, target, draft, heads, tokenizer, seed: int) -> list[dict]:
  rows = []
  nodes = [len(tree_paths(t)) for t in s.trees] if "medusa" in s.methods else []
  max_rows = max(list(s.ks) + nodes) + 1
  max_len = s.prompt_tokens + s.max_new_tokens + max_rows
  for batch in s.batches:
    prompts = _prompts(s, tokenizer, target.config.vocab_size, batch, seed + batch)
    best: dict = {}
    for round_ in range(s.rounds):  # rounds interleave the cases; the fastest run of each is kept
      cases = [("plain", 0, False, None)] + list(_cases(s, draft, heads))
      for method, k, adaptive, spec in cases:
        stats, seconds, outs = _measure(target, prompts, s, batch, spec, max_rows, max_len, warm=round_ == 0)
        key = (method, k, adaptive)
        if key not in best or seconds < best[key][1]:
          best[key] = (stats, seconds, outs)
    plain_stats, plain_s, plain_outs = best[("plain", 0, False)]
    plain_tok_s = plain_stats["generated_tokens"] / plain_s
    for (method, k, adaptive), (st, seconds, outs) in best.items():
      gen = st["generated_tokens"]
      verify = st["spec_verify_steps"]
      row = dict(batch=batch, method=method + (" adaptive" if adaptive else ""), k=k, generated=gen,
                 acceptance=st["spec_accepted_tokens"] / st["spec_draft_tokens"] if st["spec_draft_tokens"] else 0.0,
                 tokens_per_verify=(st["spec_accepted_tokens"] + verify) / verify if verify else 1.0,
                 forwards_per_token=st["steps"] * batch / gen, draft_forwards=st["draft_steps"],
                 tok_s=gen / seconds, speedup=gen / seconds / plain_tok_s,
                 same_as_plain=bool(outs == plain_outs))
      rows.append(row)
      print(f"batch {batch} {row['method']:>15} k={k}: acceptance {row['acceptance']:.2f}, "
            f"{row['tokens_per_verify']:.2f} tok/verify, {row['forwards_per_token']:.2f} fwd/tok, "
            f"{row['speedup']:.2f}x plain", flush=True)
  return rows


# ------------------------------------------------------------------------------------------------ report


def report(out, rows, s: SpeculativeRunConfig, desc: str, device: str) -> None:
  out.section("Speculative decoding vs plain decoding",
              f"{desc}; {s.prompt_tokens}-token prompts, {s.max_new_tokens} new tokens, temperature "
              f"{s.temperature}; tokens/s ratio to plain decoding at the same batch, same run. Claims: {CLAIMS}.",
              results.table_from(rows, (
                  ("batch", "batch", None), ("method", "method", None), ("k", "k", None),
                  ("acceptance", "acceptance", ".2f"), ("tokens / verify", "tokens_per_verify", ".2f"),
                  ("target fwd / token", "forwards_per_token", ".2f"), ("draft fwds", "draft_forwards", None),
                  ("tok/s vs plain", "speedup", "{:.2f}x"), ("= plain output", "same_as_plain", None))))
  plt = results.pyplot()
  fig, ax = plt.subplots(figsize=(6, 4))
  for batch in s.batches:
    for method in s.methods:
      mine = [r for r in rows if r["batch"] == batch and r["method"].split()[0] == method
              and not r["method"].endswith("adaptive")]
      line = sorted((r["k"], r["tokens_per_verify"]) for r in mine if _is_chain(r["method"]))
      if line:
        ax.plot(*zip(*line), "o-", label=f"{method}{' chains' if method == 'medusa' else ''}, batch {batch}")
      for r in mine:
        if not _is_chain(r["method"]):
          ax.plot([r["k"]], [r["tokens_per_verify"]], "*", ms=10, label=f"{r['method']}, batch {batch}")
  ax.axhspan(2.2, 3.6, alpha=0.15, color="C2", label="Medusa claim 2.2-3.6x (speedup)")
  ax.axhspan(2.0, 2.5, alpha=0.15, color="C3", label="draft claim 2-2.5x (speedup)")
  ax.set(xlabel="k = drafts verified per step (medusa: tree nodes)", ylabel="tokens per verification step",
         title=f"speculative decoding, {device}")
  ax.legend(fontsize=7)
  out.figure(fig, "tokens_per_step.png")


def run(config) -> list[dict]:
  import logging

  from jaxinfer.models.config import ModelConfig

  s = read(config, SpeculativeRunConfig, SMOKE)
  m = read(config, ModelConfig, SMOKE_MODEL)
  logging.getLogger("jaxinfer.engine").setLevel(logging.WARNING)
  target, draft, heads, tokenizer = _models(s, m, config.seed)
  tc, dc = target.config, draft.config
  desc = (f"target {tc.num_layers} layers x {tc.hidden_size} ({'trained: ' + s.target if s.target else 'random'}), "
          f"draft {dc.num_layers} layers x {dc.hidden_size} ({'trained: ' + s.draft if s.draft else 'random'}), "
          f"vocab {tc.vocab_size}")
  if heads is not None:
    desc += f", {heads.num_heads} Medusa heads ({'trained: ' + s.medusa_heads if s.medusa_heads else 'untrained'})"
  with results.open_run(config) as out:
    rows = measure(s, target, draft, heads, tokenizer, config.seed)
    for row in rows:
      out.log("speculative", **row)
    report(out, rows, s, desc, out.env["device_kind"])
    print(out.markdown)
  return rows
