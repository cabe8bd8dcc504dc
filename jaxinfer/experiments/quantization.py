"""Driver: weight quantization on the quickstart-trained model: held-out perplexity, weight bytes and decode
speed of float32, bf16, int8 (W8A16), LLM.int8(), int4 RTN / GPTQ (with and without act-order) and 3-bit RTN /
GPTQ, set beside GPTQ's and LLM.int8()'s claims.

Config: experiments/quantization.py (section `quantization`, QuantizationExperimentConfig below, and `data`,
the quickstart's data settings, so the held-out documents are the ones training held out).

  variant      weights                                              activations
  float32      float32                                              float32
  bf16         bfloat16                                             bfloat16   (the decode-speed baseline)
  int8         8-bit per output channel, symmetric (W8A16)          float32
  llm_int8     int8 per channel + outlier dims (|x| > 6) in float   int8 rows / float outliers
  rtn4, gptq4  4-bit, group 128, min-max grid                       float32    (gptq4_act: act-order)
  rtn3, gptq3  3-bit, group 128                                      float32
  *_lm         the same with the lm_head quantized too (--config.quantization.variants=...)

Every quantized variant starts from the float32 model; GPTQ's Hessians come from `calibration_rows` rows of the
training split (jaxinfer.quantize(..., calibration=...)). Perplexity: exp(mean next-token NLL) over the first
`eval_rows` packed rows of the held-out split. Decode: jaxinfer.generate, greedy, `decode_batch` prompts of
`decode_prompt` tokens, `decode_tokens` new ones, all variants interleaved round by round (timing.compare);
tokens/s and the ratio to bf16 measured in the same run. Weight bytes: every parameter as stored (codes,
scales, zero points, the float embedding and lm_head).
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


@dataclasses.dataclass(frozen=True)
class Variant:
  dtype: str = "float32"  # the float model it starts from
  method: str | None = None  # jaxinfer.quantize method; None: the float model itself
  bits: int | None = None
  act_order: bool = False
  lm_head: bool = False  # also quantize the lm_head (the default rules keep it float)


WITH_LM_HEAD = ("lm_head", r"layers\.\d+\..*")  # rules of the *_lm variants

VARIANTS = {
    "float32": Variant(),
    "bf16": Variant(dtype="bfloat16"),
    "int8": Variant(method="int8", bits=8),
    "llm_int8": Variant(method="llm_int8", bits=8),
    "rtn4": Variant(method="rtn", bits=4),
    "gptq4": Variant(method="gptq", bits=4),
    "gptq4_act": Variant(method="gptq", bits=4, act_order=True),
    "rtn3": Variant(method="rtn", bits=3),
    "gptq3": Variant(method="gptq", bits=3),
    # the lm_head too: in a small, briefly trained model it carries much of what the model knows
    "rtn4_lm": Variant(method="rtn", bits=4, lm_head=True),
    "gptq4_lm": Variant(method="gptq", bits=4, lm_head=True),
    "rtn3_lm": Variant(method="rtn", bits=3, lm_head=True),
    "gptq3_lm": Variant(method="gptq", bits=3, lm_head=True),
}
DEFAULT_VARIANTS = ("float32", "bf16", "int8", "llm_int8", "rtn4", "gptq4", "gptq4_act", "rtn3", "gptq3")


@dataclasses.dataclass(frozen=True)
class QuantizationExperimentConfig:
  SECTION = "quantization"
  checkpoint: str = path_field("results/quickstart/hf")  # a Hugging Face folder; "" (smoke): random model
  variants: tuple[str, ...] = DEFAULT_VARIANTS
  group_size: int = 128
  seq_len: int = 256
  eval_rows: int = 64  # held-out rows of seq_len tokens
  calibration_rows: int = 64  # training rows for GPTQ's Hessians
  batch_rows: int = 8  # rows per evaluation / calibration batch
  decode_batch: int = 4
  decode_prompt: int = 32
  decode_tokens: int = 64
  decode_rounds: int = 2
  decode_repeats: int = 2

  def __post_init__(self):
    cls = type(self)
    check(cls, "variants", bool(self.variants) and set(self.variants) <= set(VARIANTS) and "bf16" in self.variants,
          f"choose from {tuple(VARIANTS)} (bf16 is the speed baseline, always included), got {self.variants}")
    for name in ("group_size", "seq_len", "eval_rows", "calibration_rows", "batch_rows", "decode_batch",
                 "decode_prompt", "decode_tokens", "decode_rounds", "decode_repeats"):
      value = getattr(self, name)
      check(cls, name, isinstance(value, int) and value >= 1, f"must be a positive integer, got {value!r}")


SMOKE = dict(checkpoint="", variants=("float32", "bf16", "gptq4_act"), group_size=32, seq_len=32,
             eval_rows=8, calibration_rows=8, batch_rows=4, decode_batch=2, decode_prompt=8, decode_tokens=4,
             decode_rounds=1, decode_repeats=1)
SMOKE_MODEL = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_layers=1, num_heads=4, num_kv_heads=2,
                   max_position_embeddings=128)

CLAIMS = [
    ("GPTQ (Frantar et al.)", "3-4 bit weights with a small perplexity increase where round-to-nearest collapses "
     "(e.g. OPT-175B at 4-bit); \"quantize GPT models with 175 billion parameters in approximately four GPU hours, "
     "reducing the bitwidth down to 3 or 4 bits per weight\""),
    ("LLM.int8() (Dettmers et al.)", "\"cut the memory needed for inference by half while retaining full precision "
     "performance\"; \"up to 175B parameters without any performance degradation\" (outlier threshold 6.0)"),
]


# ------------------------------------------------------------------------------------------------ data


def _rows(split, count: int, seed: int | None) -> dict[str, np.ndarray]:
  n = min(count, split.num_rows)
  ids = np.arange(n) if seed is None else np.random.default_rng(seed).choice(split.num_rows, n, replace=False)
  return split.rows(ids)


def load_data(config, s: QuantizationExperimentConfig, vocab_size: int):
  """(held-out rows, calibration rows): dicts of [n, seq_len] arrays. With a checkpoint: the quickstart's data
  section and the checkpoint's tokenizer; without (smoke): bytes of stdlib files as token ids."""
  if s.checkpoint:
    from jaxinfer.data.dataset import DataConfig, prepare_dataset

    data = read(config, DataConfig)
    data = dataclasses.replace(data, tokenizer=str(Path(s.checkpoint) / "tokenizer.json"))
    ds = prepare_dataset(data, vocab_size, s.seq_len, Path(config.workdir) / "data")
    return _rows(ds.eval, s.eval_rows, None), _rows(ds.train, s.calibration_rows, config.seed)
  from jaxinfer.data.sources import list_files, stdlib_root

  files = sorted(list_files([str(stdlib_root())], (".py",)))[:40]
  stream = np.frombuffer(b"".join(f.read_bytes() for f in files), np.uint8).astype(np.int32) % vocab_size
  need = (s.eval_rows + s.calibration_rows) * (s.seq_len + 1)
  rows = stream[:need].reshape(-1, s.seq_len + 1)

  def pack(r):
    return dict(inputs=r[:, :-1], targets=r[:, 1:], positions=np.broadcast_to(np.arange(s.seq_len, dtype=np.int32), (len(r), s.seq_len)),
                segment_ids=np.ones((len(r), s.seq_len), np.int32), loss_mask=np.ones((len(r), s.seq_len), np.int32))

  return pack(rows[:s.eval_rows]), pack(rows[s.eval_rows:])


# ------------------------------------------------------------------------------------------------ models


def random_model(cfg, seed: int):
  """A random model without jax.random (numpy normals, norms at one): smoke runs skip threefry's compiles."""
  import jax
  import jax.numpy as jnp
  from flax import nnx

  from jaxinfer.models.transformer import Transformer

  graphdef, state = nnx.split(nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0))))
  rng = np.random.default_rng(seed)

  def fill(path, leaf):
    if str(path[-1]) == "weight":  # RMSNorm scales
      return jnp.ones(leaf.shape, leaf.dtype)
    return jnp.asarray(rng.standard_normal(leaf.shape) * cfg.initializer_range, leaf.dtype)

  return nnx.merge(graphdef, jax.tree.map_with_path(lambda p, x: fill([getattr(k, "key", k) for k in p], x), state))


def float_models(config, s, dtypes):
  """dtype -> the float model (the checkpoint, or a seeded random model in smoke runs)."""
  from jaxinfer.checkpoint.hf import load_hf
  from jaxinfer.models.config import ModelConfig

  if s.checkpoint:
    return {d: load_hf(s.checkpoint, dtype=d) for d in dtypes}
  cfg = read(config, ModelConfig, SMOKE_MODEL) if "model" in config else ModelConfig(**SMOKE_MODEL)
  return {d: random_model(cfg.replace(param_dtype=d, dtype=d), config.seed) for d in dtypes}


def build(variant: Variant, floats, s, calibration):
  from jaxinfer.quant import quantize

  model = floats[variant.dtype]
  if variant.method is None:
    return model
  batches = [calibration["inputs"][i:i + s.batch_rows] for i in range(0, len(calibration["inputs"]), s.batch_rows)]
  rules = {"rules": WITH_LM_HEAD} if variant.lm_head else {}
  return quantize(model, method=variant.method, bits=variant.bits,
                  group_size=-1 if variant.method in ("int8", "llm_int8") else s.group_size,
                  act_order=variant.act_order, calibration=batches, **rules)


def perplexity(model, rows, batch_rows: int) -> float:
  import jax
  import jax.numpy as jnp
  from flax import nnx

  from jaxinfer.train.loss import next_token_nll

  graphdef, state = nnx.split(model)

  @jax.jit
  def nll(state, inputs, targets, positions, segment_ids, mask):
    logits = nnx.merge(graphdef, state)(inputs, positions, segment_ids)
    return next_token_nll(logits, targets, mask)

  total, count = 0.0, 0.0
  for i in range(0, len(rows["inputs"]), batch_rows):
    part = {k: jnp.asarray(v[i:i + batch_rows]) for k, v in rows.items()}
    s, c = nll(state, part["inputs"], part["targets"], part["positions"], part["segment_ids"], part["loss_mask"])
    total, count = total + float(s), count + float(c)
  return float(np.exp(total / max(count, 1.0)))


def held_out_hessians(model, rows, batch_rows: int) -> dict[str, np.ndarray]:
  """path -> 2 X X^T / n of every Linear's input on the held-out rows (float32 model)."""
  from jaxinfer.quant.api import selected_linears
  from jaxinfer.quant.calibration import hessians

  paths = [p for p, _ in selected_linears(model, (".*",))]
  return hessians(model, paths, [rows["inputs"][i:i + batch_rows] for i in range(0, len(rows["inputs"]), batch_rows)])


def layer_output_error(model, reference, test_h) -> float | None:
  """Mean over the quantized layers of ||(W - Q) X|| / ||W X|| on the held-out inputs X the float model feeds
  them: sqrt(tr(E^T H E) / tr(W^T H W)) with E = W - Q, from the held-out Hessians (no extra forward pass)."""
  from flax import nnx

  from jaxinfer.models.layers import Linear
  from jaxinfer.quant.rules import path_name

  ref = {path_name(p): m for p, m in nnx.iter_modules(reference) if isinstance(m, Linear)}
  errs = []
  for p, m in nnx.iter_modules(model):
    if isinstance(m, Linear) and not isinstance(m.kernel, nnx.Variable):
      name = path_name(p)
      w = np.asarray(ref[name].kernel.get_value(), np.float64)
      e = w - np.asarray(m.kernel.dequantized(), np.float64)
      h = test_h[name]
      errs.append(np.sqrt(np.trace(e.T @ h @ e) / np.trace(w.T @ h @ w)))
  return float(np.mean(errs)) if errs else None


def decode_speeds(models, s, prompts) -> dict[str, float]:
  """variant -> generated tokens per second (greedy, interleaved rounds; baseline bf16)."""
  from jaxinfer.generation import generate

  cases = {name: Case(lambda m=m: generate(m, prompts, s.decode_tokens)) for name, m in models.items()}
  c = compare(cases, baseline="bf16", rounds=s.decode_rounds, warmup=1, repeats=s.decode_repeats)
  return {name: len(prompts) * s.decode_tokens / c.time(name) for name in models}


# ------------------------------------------------------------------------------------------------ report


def table(rows) -> str:
  return results.table_from(rows, [
      ("variant", "variant", None), ("weights", "weights", None), ("held-out ppl", "ppl", ".3f"),
      ("vs float32", "ppl_increase_pct", "{:+.2f}%"), ("layer output error", "layer_error", ".4f"),
      ("weight MB", "weight_mb", ".3f"),
      ("linear MB", "linear_mb", ".3f"), ("decode tok/s", "decode_tok_s", ".1f"), ("vs bf16", "vs_bf16", "{:.2f}x")])


def describe_weights(v: Variant, s) -> str:
  if v.method is None:
    return v.dtype
  if v.method in ("int8", "llm_int8"):
    return f"{v.method}, per channel"
  return (f"{v.method} {v.bits}-bit g{s.group_size}" + (" act-order" if v.act_order else "")
          + (" + lm_head" if v.lm_head else ""))


NOISE_PCT = 0.1  # perplexity differences below this (% of float32's) are read as indistinguishable


def verdict(by_name) -> list[str]:
  """The expected shape, checked on this run's numbers (only for the variants it ran)."""
  out = []
  f = by_name.get("float32")
  if f is None:
    return out

  def gap(name):
    return by_name[name]["ppl"] - f["ppl"]

  noise = NOISE_PCT / 100 * f["ppl"]

  for rtn, gptq in (("rtn4", "gptq4"), ("rtn4", "gptq4_act"), ("rtn3", "gptq3"), ("rtn4_lm", "gptq4_lm"),
                    ("rtn3_lm", "gptq3_lm")):
    if rtn in by_name and gptq in by_name and by_name[gptq].get("layer_error") is not None:
      le_g, le_r = by_name[gptq]["layer_error"], by_name[rtn]["layer_error"]
      out.append(f"- {gptq} vs {rtn}: held-out layer output error {le_g:.4f} vs {le_r:.4f} -> "
                 f"{'GPTQ lower' if le_g < le_r else 'GPTQ NOT lower'} ({le_g / le_r:.2f}x).")
    if rtn in by_name and gptq in by_name:
      if max(abs(gap(gptq)), abs(gap(rtn))) < noise:
        reading = f"both within {NOISE_PCT}% of float32: indistinguishable here"
      else:
        reading = "GPTQ closer to float (as claimed)" if abs(gap(gptq)) < abs(gap(rtn)) else "GPTQ NOT closer to float"
      out.append(f"- {gptq} vs {rtn}: perplexity gap to float32 {gap(gptq):+.3f} vs {gap(rtn):+.3f} -> {reading}.")
  if "llm_int8" in by_name:
    pct = by_name["llm_int8"]["ppl_increase_pct"]
    out.append(f"- llm_int8: {pct:+.2f}% perplexity vs float32 -> "
               f"{'about lossless (within 1%, as claimed)' if abs(pct) < 1.0 else 'NOT within 1% of float32'}.")
  return out


def plot(rows):
  plt = results.pyplot()
  fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
  names = [r["variant"] for r in rows]
  a.bar(names, [r["ppl_increase_pct"] for r in rows], color=["#888" if r["method"] is None else "#3a7" if
                                                              (r["method"] or "").startswith(("int8", "llm"))
                                                              else "#c63" if r["method"] == "rtn" else "#36c"
                                                              for r in rows])
  a.axhline(0, color="k", lw=0.8)
  a.set_ylabel("held-out perplexity increase over float32 (%)")
  a.set_title("quality (GPTQ: small increase at 3-4 bits; LLM.int8(): none)")
  a.tick_params(axis="x", rotation=45)
  for r in rows:
    b.scatter(r["weight_mb"], r["ppl"], s=30)
    b.annotate(r["variant"], (r["weight_mb"], r["ppl"]), fontsize=8, xytext=(3, 3), textcoords="offset points")
  b.set_xlabel("weight MB (as stored)")
  b.set_ylabel("held-out perplexity")
  b.set_title("perplexity vs weight bytes")
  return fig


def run(config) -> list[dict]:
  from jaxinfer.quant.api import weight_bytes

  resolve_paths(QuantizationExperimentConfig, config.quantization, "quantization")
  s = read(config, QuantizationExperimentConfig, SMOKE)
  check(QuantizationExperimentConfig, "checkpoint", not s.checkpoint or (Path(s.checkpoint) / "config.json").is_file(),
        f"{s.checkpoint!r} holds no config.json; train the quickstart model first (jaxinfer train --config "
        "experiments/quickstart.py) or point quantization.checkpoint at its hf folder")
  logging.getLogger("jaxinfer").setLevel(logging.WARNING)
  variants = {name: VARIANTS[name] for name in s.variants}
  floats = float_models(config, s, sorted({v.dtype for v in variants.values()}))
  vocab = next(iter(floats.values())).config.vocab_size
  held_out, calibration = load_data(config, s, vocab)
  prompts = [r[:s.decode_prompt].tolist() for r in held_out["inputs"][:s.decode_batch]]
  test_h = held_out_hessians(floats["float32"], held_out, s.batch_rows) if "float32" in floats else {}
  with results.open_run(config) as out:
    rows, models = [], {}
    for name, v in variants.items():
      model = models[name] = build(v, floats, s, calibration)
      ppl = perplexity(model, held_out, s.batch_rows)
      nbytes = weight_bytes(model)
      err = layer_output_error(model, floats["float32"], test_h) if test_h and v.method else None
      rows.append(dict(variant=name, method=v.method, bits=v.bits, act_order=v.act_order, weights=describe_weights(v, s),
                       ppl=ppl, layer_error=err, weight_mb=nbytes["total"] / 1e6, linear_mb=nbytes["linear"] / 1e6))
      print(f"{name}: held-out perplexity {ppl:.3f}, {nbytes['total'] / 1e6:.2f} MB", flush=True)
    speeds = decode_speeds(models, s, prompts)
    base_ppl = next((r["ppl"] for r in rows if r["variant"] == "float32"), rows[0]["ppl"])
    for r in rows:
      r.update(decode_tok_s=speeds[r["variant"]], vs_bf16=speeds[r["variant"]] / speeds["bf16"],
               ppl_increase_pct=100.0 * (r["ppl"] / base_ppl - 1.0))
      out.log("quantization", **r)
    by_name = {r["variant"]: r for r in rows}
    source = s.checkpoint or f"a random {SMOKE_MODEL['num_layers']}-layer model (smoke)"
    out.section("Held-out perplexity, weight bytes and decode speed",
                f"Model: {source}. {len(held_out['inputs'])} held-out rows of {s.seq_len} tokens; GPTQ calibrated on "
                f"{len(calibration['inputs'])} training rows; decode: {s.decode_batch} prompts x {s.decode_tokens} new "
                "tokens, greedy, all variants timed in the same run (ratio to bf16). Layer output error: mean over the "
                "quantized layers of ||(W - Q) X|| / ||W X|| on the held-out inputs X the float32 model feeds them "
                "(what GPTQ minimises, measured on data it did not see). 3-bit codes are stored one per byte, so "
                "their weight bytes exceed 4-bit's.", table(rows))
    out.section("Against the papers' claims", "\n".join(f"- {who}: {claim}" for who, claim in CLAIMS),
                "This run:\n" + "\n".join(verdict(by_name)))
    out.figure(plot(rows), "quantization.png", dpi=110)
    print(out.markdown)
  return rows
