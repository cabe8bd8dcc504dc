"""Driver: quantized KV caches (engine.kv_cache_dtype) on the quickstart-trained model: held-out perplexity and
greedy agreement with the float32 cache, KV bytes per token, pages in a fixed byte budget and engine decode
speed, for float32 / bfloat16 / int8 / float8_e4m3fn caches (keys per channel or per token), set beside
KIVI's and KVQuant's claims.

Config: experiments/kv_quantization.py (section `kv_quantization`, KVQuantExperimentConfig below, and `data`,
the quickstart's data settings, so the held-out rows are the documents its training held out).

Perplexity: exp(mean next-token NLL) over `eval_rows` held-out rows of `seq_len` tokens, teacher-forced through
the engine's paged path (jaxinfer/engine/kv_quant_eval.paged_logits: chunks of `chunk` tokens written into a
pool of the variant's dtype, quantize on write, ragged paged attention over the pool), the model in float32
so that the KV dtype is the only difference. Greedy agreement: how often the argmax of those logits equals
the float32 cache's; max logit error against it. KV bytes per token: the engine pool's nbytes (codes and
scales) / its slots. Pages in budget: num_pages that engine.kv_cache_bytes=`budget_mb` MB yields. Decode:
Engine.run of `decode_batch` held-out prompts of `decode_prompt` tokens, `decode_tokens` greedy new ones, all
variants timed in the same run (timing.compare), tokens/s and the ratio to the float32 cache.
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

VARIANTS = {  # name -> (kv_cache_dtype, key granularity)
    "float32": ("float32", "per_channel"),
    "bfloat16": ("bfloat16", "per_channel"),
    "int8": ("int8", "per_channel"),
    "int8_tok": ("int8", "per_token"),
    "fp8": ("float8_e4m3fn", "per_channel"),
    "fp8_tok": ("float8_e4m3fn", "per_token"),
}


@dataclasses.dataclass(frozen=True)
class KVQuantExperimentConfig:
  SECTION = "kv_quantization"
  checkpoint: str = path_field("results/quickstart/hf")  # a Hugging Face folder; "" (smoke): random model
  variants: tuple[str, ...] = tuple(VARIANTS)
  seq_len: int = 256
  eval_rows: int = 24  # held-out rows of seq_len tokens
  chunk: int = 64  # prefill chunk of the teacher-forced pass (chunks end mid-page when page_size does not divide)
  page_size: int = 16
  budget_mb: int = 64  # engine.kv_cache_bytes for the pages-in-budget column
  decode_batch: int = 8
  decode_prompt: int = 32
  decode_tokens: int = 64
  decode_rounds: int = 2
  decode_repeats: int = 2
  calibration_rows: int = 1  # (unused: the data loader of the weight-quantization experiment reads it)

  def __post_init__(self):
    cls = type(self)
    check(cls, "variants", bool(self.variants) and set(self.variants) <= set(VARIANTS) and "float32" in self.variants,
          f"choose from {tuple(VARIANTS)} (float32 is the baseline, always included), got {self.variants}")
    for name in ("seq_len", "eval_rows", "chunk", "page_size", "budget_mb", "decode_batch", "decode_prompt",
                 "decode_tokens", "decode_rounds", "decode_repeats", "calibration_rows"):
      value = getattr(self, name)
      check(cls, name, isinstance(value, int) and value >= 1, f"must be a positive integer, got {value!r}")


SMOKE = dict(checkpoint="", variants=("float32", "int8_tok"), seq_len=24, eval_rows=2, chunk=8, page_size=4,
             budget_mb=1, decode_batch=2, decode_prompt=6, decode_tokens=4, decode_rounds=1, decode_repeats=1)

CLAIMS = [
    ("KIVI (Liu et al.)", "2-bit KV cache, keys quantized per channel and values per token, \"almost the same "
     "quality\" on Llama / Falcon / Mistral; 2.6x less peak memory, up to 4x larger batch"),
    ("KVQuant (Hooper et al.)", "per-channel pre-RoPE keys, per-token values, non-uniform types, dense-and-sparse "
     "outliers: < 0.1 perplexity degradation at 3-bit on Wikitext-2 / C4 (LLaMA, Llama-2, Mistral)"),
]


def perplexity_and_agreement(model, rows, s, kv_dtype, gran, ref_logits=None):
  """(ppl, teacher-forced logits per row) through the paged path with a kv_dtype cache."""
  from jaxinfer.engine.kv_quant_eval import paged_logits

  nll, count, logits = 0.0, 0, []
  for inputs, targets in zip(rows["inputs"], rows["targets"]):
    lg = paged_logits(model, inputs, kv_cache_dtype=kv_dtype, page_size=s.page_size, chunk=s.chunk,
                      key_granularity=gran)
    lse = np.log(np.exp(lg - lg.max(-1, keepdims=True)).sum(-1)) + lg.max(-1)
    nll += float(np.sum(lse - lg[np.arange(len(targets)), targets]))
    count += len(targets)
    logits.append(lg)
  return float(np.exp(nll / count)), logits


def decode_engines(model, s, prompts, variants):
  from jaxinfer.engine import Engine

  engines = {}
  for name in variants:
    dtype, gran = VARIANTS[name]
    # every prompt prefilled in one step of one token bucket: few programs to compile per engine
    step_tokens = s.decode_batch * s.decode_prompt
    engines[name] = Engine(model, max_batch_size=s.decode_batch, page_size=s.page_size,
                           max_model_len=s.decode_prompt + s.decode_tokens, kv_cache_dtype=dtype,
                           kv_quant_key_granularity=gran, max_step_tokens=step_tokens, min_token_bucket=step_tokens,
                           min_seq_bucket=s.decode_batch)
  cases = {name: Case(lambda e=e: e.run(prompts, max_new_tokens=s.decode_tokens, progress=False))
           for name, e in engines.items()}
  c = compare(cases, baseline="float32", rounds=s.decode_rounds, warmup=1, repeats=s.decode_repeats)
  speeds = {name: len(prompts) * s.decode_tokens / c.time(name) for name in engines}
  return engines, speeds


def table(rows) -> str:
  return results.table_from(rows, [
      ("variant", "variant", None), ("kv dtype", "kv_dtype", None), ("keys", "keys", None),
      ("held-out ppl", "ppl", ".3f"), ("vs float32", "ppl_increase_pct", "{:+.3f}%"),
      ("greedy agreement", "agreement", ".4f"), ("max logit err", "max_logit_err", ".3g"),
      ("KV bytes/token", "kv_bytes_per_token", ".0f"), ("vs float32 bytes", "bytes_ratio", "{:.3f}x"),
      ("pages in budget", "pages_in_budget", None), ("decode tok/s", "decode_tok_s", ".1f"),
      ("vs float32", "vs_float32", "{:.2f}x")])


def plot(rows):
  plt = results.pyplot()
  fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.6))
  names = [r["variant"] for r in rows]
  a.bar(names, [r["kv_bytes_per_token"] for r in rows], color="tab:blue")
  a.set_ylabel("KV bytes per token")
  a.set_title("KV cache bytes per token (scales included)")
  b.bar(names, [r["ppl_increase_pct"] for r in rows], color="tab:orange")
  b.set_ylabel("held-out perplexity vs float32 cache (%)")
  b.set_title("perplexity cost of the KV dtype")
  for ax in (a, b):
    ax.tick_params(axis="x", rotation=30)
  return fig


def run(config) -> list[dict]:
  from jaxinfer.engine.config import EngineConfig
  from jaxinfer.experiments import quantization as wq

  resolve_paths(KVQuantExperimentConfig, config.kv_quantization, "kv_quantization")
  s = read(config, KVQuantExperimentConfig, SMOKE)
  check(KVQuantExperimentConfig, "checkpoint", not s.checkpoint or (Path(s.checkpoint) / "config.json").is_file(),
        f"{s.checkpoint!r} holds no config.json; train the quickstart model first (jaxinfer train --config "
        "experiments/quickstart.py) or point kv_quantization.checkpoint at its hf folder")
  logging.getLogger("jaxinfer").setLevel(logging.WARNING)
  model = wq.float_models(config, s, ["float32"])["float32"]
  held_out, _ = wq.load_data(config, s, model.config.vocab_size)
  held_out = {k: v[:s.eval_rows] for k, v in held_out.items()}
  prompts = [r[:s.decode_prompt].tolist() for r in held_out["inputs"][:s.decode_batch]]
  while len(prompts) < s.decode_batch:
    prompts.append(prompts[len(prompts) % max(1, len(prompts))])
  with results.open_run(config) as out:
    rows, ref = [], None
    for name in s.variants if s.variants[0] == "float32" else ("float32",) + tuple(
        v for v in s.variants if v != "float32"):
      dtype, gran = VARIANTS[name]
      ppl, logits = perplexity_and_agreement(model, held_out, s, dtype, gran)
      if ref is None:
        ref = logits
      agree = float(np.mean(np.concatenate([a.argmax(-1) == b.argmax(-1) for a, b in zip(logits, ref)])))
      err = float(max(np.abs(a - b).max() for a, b in zip(logits, ref)))
      budget = EngineConfig(kv_cache_dtype=dtype, kv_quant_key_granularity=gran, page_size=s.page_size,
                            kv_cache_bytes=s.budget_mb << 20).resolve(model.config)
      rows.append(dict(variant=name, kv_dtype=dtype, keys=gran if dtype in ("int8", "float8_e4m3fn") else "-",
                       ppl=ppl, agreement=agree, max_logit_err=err, pages_in_budget=budget.num_pages))
      print(f"{name}: held-out perplexity {ppl:.4f}, greedy agreement {agree:.4f}", flush=True)
    engines, speeds = decode_engines(model, s, prompts, [r["variant"] for r in rows])
    by_name = {r["variant"]: r for r in rows}
    for r in rows:
      pool = engines[r["variant"]].runner.pool
      r.update(kv_bytes_per_token=pool.nbytes / pool.num_slots, decode_tok_s=speeds[r["variant"]],
               vs_float32=speeds[r["variant"]] / speeds["float32"],
               ppl_increase_pct=100.0 * (r["ppl"] / by_name["float32"]["ppl"] - 1.0))
    for r in rows:
      r["bytes_ratio"] = r["kv_bytes_per_token"] / by_name["float32"]["kv_bytes_per_token"]
      out.log("kv_quantization", **r)
    source = s.checkpoint or f"a random {wq.SMOKE_MODEL['num_layers']}-layer model (smoke)"
    out.section("Held-out perplexity, KV bytes and decode speed by KV cache dtype",
                f"Model: {source}, run in float32 (only the KV cache dtype changes). {len(held_out['inputs'])} "
                f"held-out rows of {s.seq_len} tokens, teacher-forced through the paged engine path in chunks of "
                f"{s.chunk} (page size {s.page_size}). Greedy agreement / max logit error: against the float32 "
                f"cache's logits at every position. Pages in budget: engine.kv_cache_bytes = {s.budget_mb} MB. "
                f"Decode: {s.decode_batch} prompts x {s.decode_tokens} new tokens through Engine.run, all "
                "variants timed in the same run (ratio to the float32 cache; CPU, xla kernels).", table(rows))
    out.section("Against the papers' claims", "\n".join(f"- {who}: {claim}" for who, claim in CLAIMS),
                "This run (8-bit, not 2-4 bit): " + "; ".join(
                    f"{r['variant']} {r['ppl_increase_pct']:+.3f}% perplexity at {r['bytes_ratio']:.3f}x the "
                    "float32 bytes" for r in rows if r["variant"] != "float32"))
    out.figure(plot(rows), "kv_quantization.png", dpi=110)
    print(out.markdown)
  return rows
