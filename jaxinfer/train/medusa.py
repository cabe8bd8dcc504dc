"""train.objective "medusa": Medusa-1 heads trained on a frozen base model (Cai et al. 2024, sec. 2.2.1).

  jaxinfer train --config experiments/medusa.py

The base is a Hugging Face directory (config.json, model.safetensors, tokenizer.json: `medusa.base_dir`),
loaded once and never trained: its parameters are an input of the jitted step, not part of the TrainState,
so they get no gradient and no optimizer state, and the checkpoints hold only the heads and their optimizer.
Each step runs the base to its final hidden states (stop_gradient), then the heads
(jaxinfer.models.medusa.MedusaHeads, initialised with init_from_base: every head starts as the lm_head).

Objective. Head k (k = 0 .. K-1) reads position t and predicts the token k + 2 places ahead, token t + k + 2
(the base's lm_head predicts t + 1). In a packed row that token is targets[t + k + 1], and it counts only if
tokens t .. t + k + 2 all lie in the row and in one document: loss_mask (1 where token j + 1 continues token
j's document) is 1 at every j in t .. t + k + 1. L_k is head k's mean cross entropy over the positions that
count, and the step minimises sum_k lambda_k L_k, lambda_k = medusa.decay_coefficient ** k (the paper's
0.8^k). Each L_k is an exact mean over the whole batch: its counts depend on the loss mask only, so they are
taken before the gradient-accumulation scan.

The data are tokenized with the base's own tokenizer (data.tokenizer is set to the base's tokenizer.json).
Use the base's data section (same files, max_bytes, eval_fraction and seed) so that the held-out documents,
on which the heads' top-1 / top-3 accuracies are measured, are ones the base never trained on either.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from jaxinfer.config import ConfigError, from_section, path_field, require, resolve_paths
from jaxinfer.experiments.results import write_json
from jaxinfer.models.medusa import MedusaConfig, MedusaHeads, save_medusa_heads
from jaxinfer.train.flops import train_flops_per_token
from jaxinfer.train.step import BATCH_FIELDS, batch_sharding, optimizer_step

log = logging.getLogger("jaxinfer.train")

BASELINE_FILE = "untrained_heads.json"  # workdir: held-out metrics of the heads as initialised (copies of lm_head)


@dataclasses.dataclass(frozen=True)
class MedusaSection:
  """The `medusa` section of a train.objective="medusa" config (it replaces the `model` section)."""
  SECTION = "medusa"
  base_dir: str = path_field("results/quickstart/hf")  # the frozen base: config.json, weights, tokenizer.json
  num_heads: int = 4  # K: head k predicts the token k + 2 places ahead
  num_layers: int = 1  # residual blocks per head
  decay_coefficient: float = 0.8  # head k's loss weight lambda_k = decay_coefficient ** k
  output_dir: str = path_field("")  # where medusa_heads.safetensors + medusa_config.json go; empty: base_dir
  dtype: str = "float32"  # compute dtype of the base forward and of the heads (float32 master weights)

  def __post_init__(self):
    for name in ("num_heads", "num_layers"):
      value = getattr(self, name)
      require(isinstance(value, int) and not isinstance(value, bool) and value >= 1, f"medusa.{name}",
              f"must be a positive integer, got {value!r}")
    require(isinstance(self.decay_coefficient, (int, float)) and 0 < self.decay_coefficient <= 1,
            "medusa.decay_coefficient", f"must lie in (0, 1], got {self.decay_coefficient!r}")
    require(self.dtype in ("float32", "bfloat16"), "medusa.dtype", f"{self.dtype!r} is not float32 or bfloat16")
    require(bool(self.base_dir), "medusa.base_dir", "must name the base model's Hugging Face directory")


def medusa_section(**overrides):
  """The `medusa` ConfigDict (every field present, overridable as --config.medusa.<field>=...)."""
  from jaxinfer.config import to_section

  return to_section(MedusaSection, **overrides)


# --------------------------------------------------------------------------------------------- objective
def head_targets(targets, loss_mask, num_heads: int):
  """(targets, mask), both [..., seq, K]: head k's target at position t (token t + k + 2 = targets[t + k + 1])
  and whether it counts (loss_mask is 1 at t .. t + k + 1: same document, inside the row, not padding)."""
  seq = targets.shape[-1]
  mask = loss_mask.astype(bool)
  out_t, out_m = [], []
  for k in range(num_heads):
    shift = k + 1
    pad = [(0, 0)] * (targets.ndim - 1) + [(0, min(shift, seq))]
    ahead_t = jnp.pad(targets[..., shift:], pad)
    ahead_m = jnp.pad(loss_mask[..., shift:].astype(bool), pad)
    mask = mask & ahead_m  # head k's window is head k-1's plus one more token
    out_t.append(ahead_t)
    out_m.append(mask)
  return jnp.stack(out_t, -1), jnp.stack(out_m, -1)


def head_weights(num_heads: int, decay: float):
  return jnp.asarray([decay ** k for k in range(num_heads)], jnp.float32)


def head_nll(logits, targets, mask):
  """Per-head sums of -log p(target) over the positions that count: logits [..., K, V] -> [K]."""
  nll = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), targets)
  axes = tuple(range(nll.ndim - 1))
  return jnp.sum(nll * mask.astype(jnp.float32), axis=axes)


def base_hidden(base_graphdef, base_params, micro):
  """The frozen base's final hidden states [rows, seq, D] (after the final norm), with no gradient path."""
  base = nnx.merge(base_graphdef, base_params)
  hidden = base(micro["inputs"], micro["positions"], micro["segment_ids"], return_hidden=True)
  return jax.lax.stop_gradient(hidden)


def medusa_loss_and_grads(graphdef, base_graphdef, params, base_params, batch, weights):
  """(weighted loss sum_k lambda_k L_k, its gradients w.r.t. the heads, per-head target counts [K], per-head
  mean losses [K]) for a [accum, rows, seq] batch."""
  num_heads = weights.shape[0]
  counts = jnp.sum(head_targets(batch["targets"], batch["loss_mask"], num_heads)[1].astype(jnp.float32),
                   axis=(0, 1, 2))
  scale = weights / jnp.maximum(counts, 1.0)

  def one(carry, micro):
    grad_sum, nll_sum = carry
    hidden = base_hidden(base_graphdef, base_params, micro)
    targets, mask = head_targets(micro["targets"], micro["loss_mask"], num_heads)

    def objective(p):
      sums = head_nll(nnx.merge(graphdef, p)(hidden), targets, mask)
      return jnp.sum(scale * sums), sums

    (_, sums), grads = jax.value_and_grad(objective, has_aux=True)(params)
    grad_sum = jax.tree.map(lambda a, g: a + g.astype(jnp.float32), grad_sum, grads)
    return (grad_sum, nll_sum + sums), None

  zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params)
  (grads, nll), _ = jax.lax.scan(one, (zeros, jnp.zeros((num_heads,), jnp.float32)), batch)
  per_head = nll / jnp.maximum(counts, 1.0)
  return jnp.sum(weights * per_head), grads, counts, per_head


def medusa_train_step(graphdef, base_graphdef, tx, weights, state, batch, base_params):
  loss, grads, counts, per_head = medusa_loss_and_grads(graphdef, base_graphdef, state["params"], base_params,
                                                        batch, weights)
  return optimizer_step(tx, state, loss, grads, counts[0], {"head_loss": per_head})


def medusa_eval_step(graphdef, base_graphdef, num_heads: int, params, batch, base_params):
  """Sums over a [n, rows, seq] batch: per-head nll, top-1 and top-3 hits and target counts ([K] each), and the
  base lm_head's next-token top-1 hits and count (the accuracy the heads are set beside)."""
  out = {k: jnp.zeros((num_heads,), jnp.float32) for k in ("nll", "top1", "top3", "count")}
  out.update(base_top1=jnp.float32(0), base_count=jnp.float32(0))
  heads = nnx.merge(graphdef, params)
  base = nnx.merge(base_graphdef, base_params)
  for i in range(batch["inputs"].shape[0]):
    micro = {k: v[i] for k, v in batch.items()}
    hidden = base_hidden(base_graphdef, base_params, micro)
    logits = heads(hidden)  # [rows, seq, K, V]
    targets, mask = head_targets(micro["targets"], micro["loss_mask"], num_heads)
    m = mask.astype(jnp.float32)
    top3 = jax.lax.top_k(logits, 3)[1]
    hit1 = (top3[..., 0] == targets).astype(jnp.float32)
    hit3 = jnp.any(top3 == targets[..., None], axis=-1).astype(jnp.float32)
    base_mask = micro["loss_mask"].astype(jnp.float32)
    base_hit = (jnp.argmax(base.logits(hidden), -1) == micro["targets"]).astype(jnp.float32)
    out["nll"] += head_nll(logits, targets, mask)
    out["top1"] += jnp.sum(hit1 * m, axis=(0, 1))
    out["top3"] += jnp.sum(hit3 * m, axis=(0, 1))
    out["count"] += jnp.sum(m, axis=(0, 1))
    out["base_top1"] += jnp.sum(base_hit * base_mask)
    out["base_count"] += jnp.sum(base_mask)
  return out


def place(tree, shardings):
  """Host arrays -> global arrays in `shardings` (each process holds the same values, e.g. read from a file)."""
  def put(x, sharding):
    host = np.asarray(jax.device_get(x))
    return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])

  return jax.tree.map(put, tree, shardings)


def compile_medusa_steps(task, graphdef, tx, abstract_state, state_sh, batch_shape, eval_shape, mesh, rules):
  """The trainer's (train_fn(state, batch), eval_fn(params, batch)) for the heads: jitted steps that also take
  the frozen base parameters, compiled ahead of time, then bound to the base placed on the mesh."""
  from jaxinfer.models.sharding import model_rules
  from parallel.sharding import state_shardings

  base_graphdef, base_state = nnx.split(task.base)
  base_sh = state_shardings(base_state, model_rules(task.base.config, mesh, rules), mesh)
  frozen = place(base_state, base_sh)
  data_sh = batch_sharding(mesh, rules)
  replicated = NamedSharding(mesh, P())
  weights = head_weights(task.section.num_heads, float(task.section.decay_coefficient))

  def spec(shape):
    return {k: jax.ShapeDtypeStruct(shape, jnp.int32, sharding=data_sh) for k in BATCH_FIELDS}

  abstract_state = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                                abstract_state, state_sh)
  abstract_base = jax.tree.map(lambda x, sh: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sh), frozen, base_sh)
  train = jax.jit(lambda state, batch, base: medusa_train_step(graphdef, base_graphdef, tx, weights, state, batch,
                                                               base),
                  in_shardings=(state_sh, data_sh, base_sh), out_shardings=(state_sh, replicated),
                  donate_argnums=(0,))
  evaluate = jax.jit(lambda params, batch, base: medusa_eval_step(graphdef, base_graphdef, task.section.num_heads,
                                                                  params, batch, base),
                     in_shardings=(state_sh["params"], data_sh, base_sh), out_shardings=replicated)
  train = train.lower(abstract_state, spec(batch_shape), abstract_base).compile()
  evaluate = evaluate.lower(abstract_state["params"], spec(eval_shape), abstract_base).compile()
  return (lambda state, batch: train(state, batch, frozen)), (lambda params, batch: evaluate(params, batch, frozen))


# ------------------------------------------------------------------------------------------------- task
class MedusaTask:
  """The trainer's task for train.objective="medusa" (see jaxinfer.train.trainer.LMTask for the interface)."""

  SECTIONS = ("medusa",)

  @staticmethod
  def section_of(config) -> MedusaSection:
    resolve_paths(MedusaSection, config.medusa, "medusa")  # a no-op when the config was loaded by the CLI
    return from_section(MedusaSection, config.medusa, "medusa")

  @classmethod
  def model_config(cls, config):
    """The base's ModelConfig from its config.json (float32 master weights, compute in medusa.dtype)."""
    from jaxinfer.checkpoint.hf import CheckpointError, read_config

    m = cls.section_of(config)
    base = Path(m.base_dir)
    hint = "(train the base first, e.g. `jaxinfer train --config experiments/quickstart.py`)"
    require(base.is_dir(), "medusa.base_dir", f"{base} does not exist or is not a directory {hint}")
    require((base / "config.json").is_file(), "medusa.base_dir",
            f"{base} has no config.json: not a Hugging Face model directory {hint}")
    require((base / "model.safetensors").is_file() or (base / "model.safetensors.index.json").is_file(),
            "medusa.base_dir", f"{base} has no model.safetensors (nor an index of shards) {hint}")
    require((base / "tokenizer.json").is_file(), "medusa.base_dir",
            f"{base} has no tokenizer.json: the heads learn the base's own tokens, so the base directory must "
            "hold the tokenizer it was trained with")
    try:
      return read_config(base, param_dtype="float32", dtype=m.dtype)
    except (CheckpointError, ValueError) as e:
      raise ConfigError(f"medusa.base_dir: {e}") from None

  def __init__(self, config, t):
    from jaxinfer.checkpoint.hf import CheckpointError, load_hf

    self.config, self.t = config, t
    self.section = m = self.section_of(config)
    require(m.num_heads < t.seq_len, "medusa.num_heads",
            f"{m.num_heads} heads predict up to {m.num_heads + 1} tokens ahead; a row of train.seq_len={t.seq_len} "
            f"tokens holds targets for at most {t.seq_len - 1} heads")
    require(t.remat == "none", "train.remat", f"{t.remat!r}: the medusa objective back-propagates through the "
            "heads only (the base is frozen), so there is nothing to rematerialise; use 'none'")
    sequence = config.mesh.get("sequence", 1) if hasattr(config.mesh, "get") else 1
    require(sequence in (1, None), "mesh.sequence", f"{sequence}: the medusa objective needs whole rows on each "
            "device (its targets lie up to num_heads + 1 tokens ahead); use mesh.sequence=1")
    base_tokenizer = Path(m.base_dir) / "tokenizer.json"
    given = config.data.get("tokenizer", "")
    require(not given or Path(given).resolve() in (base_tokenizer.resolve(), Path(m.base_dir).resolve()),
            "data.tokenizer", f"{given!r}: the medusa objective tokenizes with the base's own tokenizer "
            f"({base_tokenizer}); leave data.tokenizer empty")
    kept = Path(config.workdir) / "tokenizer.json"
    require(not kept.is_file() or kept.read_bytes() == base_tokenizer.read_bytes(), "workdir",
            f"{kept} (from an earlier run in this workdir) is not the tokenizer of the base at {m.base_dir}; "
            "use another workdir")
    config.data.tokenizer = str(base_tokenizer)  # the trainer's own copy of the config
    try:
      self.base = load_hf(m.base_dir, dtype=m.dtype)
    except (CheckpointError, ValueError) as e:
      raise ConfigError(f"medusa.base_dir: {e}") from None
    self.output_dir = Path(m.output_dir or m.base_dir)

  def heads_config(self, cfg) -> MedusaConfig:
    return MedusaConfig(num_heads=self.section.num_heads, num_layers=self.section.num_layers,
                        hidden_size=cfg.hidden_size, vocab_size=cfg.vocab_size, param_dtype="float32",
                        dtype=self.section.dtype)

  def module(self, cfg, seed: int):
    heads = MedusaHeads(self.heads_config(cfg), rngs=nnx.Rngs(seed))
    heads.init_from_base(self.base)
    return heads

  def step_module(self, module):
    return module

  def meta(self) -> dict:
    cfg = self.base.config
    return {"medusa": {"num_heads": self.section.num_heads, "num_layers": self.section.num_layers,
                       "hidden_size": cfg.hidden_size, "vocab_size": cfg.vocab_size,
                       "decay_coefficient": self.section.decay_coefficient, "base_dir": self.section.base_dir}}

  def check_resume(self, workdir, step: int, meta: dict) -> None:
    saved = meta.get("medusa")
    if not isinstance(saved, dict):
      raise ConfigError(f"workdir: {workdir} holds a checkpoint (step {step}) that is not of Medusa heads (a "
                        "language model's?); use another workdir, or delete its checkpoints/ to start over")
    here = self.meta()["medusa"]
    for name in ("num_heads", "num_layers"):
      if saved.get(name) != here[name]:
        raise ConfigError(f"medusa.{name}: the checkpoint at step {step} in {workdir} holds heads with {name}="
                          f"{saved.get(name)}, this config asks for {here[name]}; use another workdir, or delete "
                          "its checkpoints/ to start over")
    for name in ("hidden_size", "vocab_size"):
      if saved.get(name) != here[name]:
        raise ConfigError(f"medusa.base_dir: the heads in {workdir} (step {step}) were trained for a base with "
                          f"{name}={saved.get(name)}, the base at {self.section.base_dir} has {name}={here[name]}")

  def compile(self, graphdef, tx, abstract_state, state_sh, batch_shape, eval_shape, mesh, rules):
    return compile_medusa_steps(self, graphdef, tx, abstract_state, state_sh, batch_shape, eval_shape, mesh, rules)

  def flops_per_token(self, cfg, seq_len: int) -> float:
    """The base's forward plus the heads' forward and backward (matmul FLOPs)."""
    m = self.section
    heads = m.num_heads * (m.num_layers * cfg.hidden_size ** 2 + cfg.hidden_size * cfg.vocab_size)
    return train_flops_per_token(cfg, seq_len) / 3.0 + 6.0 * heads

  def step_record(self, metrics) -> dict:
    return {f"loss_head{k}": float(v) for k, v in enumerate(np.asarray(metrics["head_loss"]))}

  def evaluate(self, eval_fn, params, batches) -> dict:
    sums = None
    for b in batches:
      out = jax.device_get(eval_fn(params, b))
      sums = out if sums is None else jax.tree.map(lambda a, x: a + x, sums, out)
    count = np.maximum(np.asarray(sums["count"], np.float64), 1.0)
    per_head = np.asarray(sums["nll"], np.float64) / count
    weights = np.asarray(head_weights(self.section.num_heads, float(self.section.decay_coefficient)), np.float64)
    record = {"eval_loss": float(np.sum(weights * per_head))}
    for k in range(self.section.num_heads):
      record[f"eval_loss_head{k}"] = float(per_head[k])
      record[f"eval_top1_head{k}"] = float(sums["top1"][k] / count[k])
      record[f"eval_top3_head{k}"] = float(sums["top3"][k] / count[k])
    record["eval_top1_base"] = float(sums["base_top1"] / max(float(sums["base_count"]), 1.0))
    return record

  def finish(self, end) -> list:
    from jaxinfer.train.medusa_report import unigram_accuracy, write_medusa_report

    workdir, leader = end.workdir, end.leader
    if leader and self.t.export_hf and end.finished:
      path = save_medusa_heads(end.trained, self.output_dir)
      log.info("saved Medusa heads to %s", path)
    baseline_file = workdir / BASELINE_FILE
    untrained = None
    if end.evaluate is not None:  # every process evaluates (the arrays span them); the leader writes
      initial = nnx.state(self.module(end.cfg, self.config.seed))
      untrained = end.evaluate(place(initial, end.param_shardings))
      if leader and untrained:
        write_json(baseline_file, untrained)
    elif baseline_file.is_file():
      untrained = json.loads(baseline_file.read_text())
    if leader:
      from jaxinfer.train.report import read_metrics
      records = read_metrics(workdir / "metrics.jsonl")
      unigram = unigram_accuracy(end.dataset, end.cfg.vocab_size)
      write_medusa_report(self, end, records, untrained or {}, unigram)
    return []
