"""`train(config)`: config -> mesh -> sharded params -> data -> jitted steps -> checkpoints, metrics, export.

Order matters for the error rules: every config check (fields, mesh, sharding rules, divisibility) and the
compatibility check against an existing checkpoint in the workdir run before anything is written or compiled.

What is trained is the task of train.objective (jaxinfer.train.config.OBJECTIVES): it gives the trainable
module, its compiled steps, the held-out evaluation and what is written at the end. The loop, checkpoints,
resume, metrics and progress bar are the same for every objective. LMTask below is the default: the
language model of the `model` section.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import signal
import shutil
import statistics
import time
from pathlib import Path

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding

from jaxinfer.data.dataset import prepare_dataset
from jaxinfer.data.packing import BatchIterator, eval_batches
from jaxinfer.config import ConfigError, from_section, resolve_config_paths
from jaxinfer.models.config import ModelConfig
from jaxinfer.models.transformer import Transformer
from jaxinfer.checkpoint.atomic import write_atomic, write_text_atomic
from jaxinfer.train.checkpoint import Checkpointer, check_compatible, param_shapes, peek_latest
from jaxinfer.train.config import objective_task, validate_sections
from jaxinfer.train.loss import moe_record
from jaxinfer.train.flops import peak_flops_per_device, train_flops_per_token
from jaxinfer.train.optim import make_optimizer
from jaxinfer.train.remat import apply_remat
from jaxinfer.train.report import MetricsLog, plot_losses, read_metrics, write_results
from jaxinfer.train.step import batch_sharding, compile_steps, init_train_state, train_state_shardings
from parallel.mesh import ParallelConfigError, create_mesh, mesh_summary
from parallel.sharding import create_sharded_module, normalize_rules, state_shardings

log = logging.getLogger("jaxinfer.train")

FAULT_ENV = "JAXINFER_FAULT_KILL_DURING_SAVE"  # test hook: SIGKILL this process right after save(step) starts


@dataclasses.dataclass
class TrainResult:
  workdir: Path
  start_step: int
  final_step: int
  losses: dict[int, float]
  eval_loss: float | None
  stats: dict
  samples: list[tuple[str, str]]


@dataclasses.dataclass
class RunEnd:
  """What the end of a run hands its task: the trained module (host arrays) and what its report quotes."""
  config: object
  cfg: ModelConfig
  mesh: Mesh
  workdir: Path
  dataset: object  # jaxinfer.data.dataset.Dataset
  trained: nnx.Module
  finished: bool  # the schedule's last step is done (not stopped early by train.stop_after)
  leader: bool
  compile_s: float
  train_s: float
  peak_note: str
  flops_per_token: float
  num_params: int
  param_shardings: object
  evaluate: object  # params -> the task's eval record; None when nothing was compiled (nothing to train)


class LMTask:
  """train.objective "lm": next-token cross entropy of the Transformer of the `model` section; exports it to
  workdir/hf and prints sampled continuations."""

  SECTIONS = ("model",)  # the top-level config sections this objective reads beside the shared ones

  @staticmethod
  def model_config(config) -> ModelConfig:
    return from_section(ModelConfig, config.model, "model")

  def __init__(self, config, t):
    self.config, self.t = config, t

  def module(self, cfg: ModelConfig, seed: int):
    """The trainable module (called under nnx.eval_shape and inside the sharded initialiser)."""
    return Transformer(cfg, rngs=nnx.Rngs(seed))

  def step_module(self, module):
    return apply_remat(module, self.t.remat)

  def meta(self) -> dict:
    return {}  # the checkpoint meta beside model, param_shapes and config

  def check_resume(self, workdir, step: int, meta: dict) -> None:
    pass  # the model and parameter shapes are compared by check_compatible

  def compile(self, graphdef, tx, abstract_state, state_sh, batch_shape, eval_shape, mesh, rules):
    return compile_steps(graphdef, tx, abstract_state, state_sh, batch_shape, eval_shape, mesh, rules)

  def flops_per_token(self, cfg: ModelConfig, seq_len: int) -> float:
    return train_flops_per_token(cfg, seq_len)

  def step_record(self, metrics) -> dict:
    return moe_record(metrics)  # MoE models: router losses, dropped assignments, per-layer expert load

  def evaluate(self, eval_fn, params, batches) -> dict:
    nll, count = 0.0, 0.0
    for b in batches:
      n, c = jax.device_get(eval_fn(params, b))
      nll, count = nll + float(n), count + float(c)
    eval_loss = nll / max(count, 1.0)
    return {"eval_loss": eval_loss, "eval_perplexity": math.exp(min(eval_loss, 50.0))}

  def finish(self, end: RunEnd) -> list[tuple[str, str]]:
    """Export, samples and report; returns the samples."""
    config, t, ds, workdir, trained = self.config, self.t, end.dataset, end.workdir, end.trained
    samples: list[tuple[str, str]] = []
    if end.leader and t.export_hf and end.finished:
      from jaxinfer.checkpoint.hf import save_hf
      save_hf(trained, workdir / "hf")
      write_atomic(workdir / "hf" / "tokenizer.json", lambda tmp: shutil.copyfile(ds.tokenizer_file, tmp))
      log.info("exported Hugging Face checkpoint to %s", workdir / "hf")
    if t.sample_prompts and t.sample_tokens and jax.process_count() == 1 and end.finished:
      samples = sample_continuations(trained, ds.tokenizer, tuple(t.sample_prompts), t.sample_tokens,
                                     t.sample_temperature, t.sample_top_k, config.seed, ds.eos_id)
      for prompt, text in samples:
        print(f"=== sample: {prompt!r}\n{prompt}{text}\n", flush=True)
    if end.leader:
      records = read_metrics(workdir / "metrics.jsonl")
      _write_report(config, end.cfg, end.mesh, workdir, records, ds.stats, samples, end.compile_s, end.train_s,
                    end.peak_note, end.flops_per_token, end.num_params)
    return samples


@contextlib.contextmanager
def _config_errors():
  """parallel raises its own ParallelConfigError (it does not import jaxinfer): surface it as ConfigError."""
  try:
    yield
  except ParallelConfigError as e:
    raise ConfigError(str(e)) from None


def _rule_axes(rules: dict[str, tuple[str, ...]], name: str, mesh: Mesh) -> tuple[str, ...]:
  return tuple(a for a in rules.get(name, ()) if mesh.shape.get(a, 1) > 1)


def check_parallel_config(cfg: ModelConfig, mesh: Mesh, rules: dict[str, tuple[str, ...]], train) -> None:
  """Batch, sequence and head divisibility against the mesh, each error naming the field to change."""
  micro = train.batch_size // train.grad_accum
  axes = _rule_axes(rules, "batch", mesh)
  n = math.prod(mesh.shape[a] for a in axes)
  if micro % n:
    raise ConfigError(f"train.batch_size: a micro-batch of {micro} rows (batch_size {train.batch_size} / grad_accum "
                      f"{train.grad_accum}) is not divisible by the {n} devices of mesh axes {axes} that the "
                      f"'batch' sharding rule splits it over")
  seq = mesh.shape.get("sequence", 1)
  if seq > 1:
    if rules.get("seq") != ("sequence",):
      raise ConfigError(f"sharding_rules: mesh.sequence={seq} needs the rule ('seq', 'sequence'), got "
                        f"('seq', {rules.get('seq')!r})")
    multiple = 2 * seq if train.sequence_layout == "zigzag" else seq
    if train.seq_len % multiple:
      raise ConfigError(f"train.seq_len: {train.seq_len} is not divisible by {multiple} (mesh.sequence={seq}, "
                        f"layout {train.sequence_layout!r})")
  for logical, heads, field in (("heads", cfg.num_heads, "num_heads"), ("kv_heads", cfg.num_kv_heads, "num_kv_heads")):
    axes = _rule_axes(rules, logical, mesh)
    n = math.prod(mesh.shape[a] for a in axes)
    if heads % n:
      raise ConfigError(f"model.{field}: {heads} heads cannot be split over the {n} devices of mesh axes {axes} "
                        f"(rule {logical!r}); change the mesh, or map {logical!r} to None in sharding_rules")


def _local_rows(sharding: NamedSharding, shape: tuple[int, ...], axis: int = 1) -> np.ndarray:
  """Indices along `axis` of the global batch that this process's devices hold."""
  rows: set[int] = set()
  for index in sharding.addressable_devices_indices_map(shape).values():
    rows.update(range(*index[axis].indices(shape[axis])))
  return np.asarray(sorted(rows), np.int64)


def _barrier(name: str) -> None:
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices(name)


def _to_host(tree):
  """Numpy copies of (possibly sharded, possibly multi-process) arrays."""
  from jax.experimental import multihost_utils

  def get(x):
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
      return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(jax.device_get(x))

  return jax.tree.map(get, tree)


def _config_json(config) -> dict:
  try:
    return json.loads(config.to_json_best_effort())
  except Exception:  # pragma: no cover - a config holding something JSON cannot express
    return {}


def train(config) -> TrainResult:
  config = config.copy_and_resolve_references()  # the caller's config is left as it was
  resolve_config_paths(config)  # a no-op when the CLI already did it; the Orbax writer needs absolute paths
  cfg, t = validate_sections(config)
  task = objective_task(t.objective)(config, t)  # its own checks too, before anything is written
  leader = jax.process_index() == 0
  workdir = Path(config.workdir)
  with _config_errors():
    mesh = create_mesh(config.mesh)
    rules = normalize_rules(config.sharding_rules)
  check_parallel_config(cfg, mesh, rules, t)
  with _config_errors():
    abstract_params = nnx.split(nnx.eval_shape(lambda: task.module(cfg, 0)))[1]
    state_shardings(abstract_params, rules, mesh)  # divisibility of every parameter, before any write
  shapes = param_shapes(abstract_params)
  latest = peek_latest(workdir)
  if latest is not None:
    task.check_resume(workdir, latest[0], latest[1])
    check_compatible(workdir, latest[0], latest[1], cfg, shapes)

  # ------------------------------------------------------------------ data (first writes to the workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  ds = prepare_dataset(config.data, cfg.vocab_size, t.seq_len, workdir, is_leader=leader, barrier=_barrier)
  if cfg.eos_token_id is None and ds.eos_id is not None:
    cfg = cfg.replace(eos_token_id=ds.eos_id)
  if leader:
    write_text_atomic(workdir / "resolved_config.json", json.dumps(_config_json(config), indent=2))

  # ------------------------------------------------------------------ model, optimizer, state
  constructor = lambda: task.module(cfg, config.seed)
  abstract_model = nnx.eval_shape(constructor)
  graphdef, abstract_params = nnx.split(abstract_model)
  step_graphdef = nnx.split(task.step_module(abstract_model))[0]
  with _config_errors():
    param_sh = state_shardings(abstract_params, rules, mesh)
  tx, schedule = make_optimizer(t)
  state_sh = train_state_shardings(abstract_params, param_sh, tx, mesh)
  abstract_state = jax.eval_shape(lambda p: init_train_state(p, tx, config.seed), abstract_params)
  checkpointer = Checkpointer(workdir, keep=t.keep_checkpoints, async_save=t.async_checkpoint)
  start_step, position = 0, 0
  if latest is not None:
    target = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), abstract_state, state_sh)
    try:
      state, meta = checkpointer.restore(latest[0], target)
    except (ValueError, KeyError, TypeError) as e:
      raise ConfigError(f"workdir: the checkpoint at step {latest[0]} in {workdir} does not fit this run's training "
                        f"state (were optimizer settings such as train.grad_clip changed?): {e}") from None
    start_step, position = int(meta["step"]), int(meta["data_position"])
    log.info("resumed from %s at step %d (data position %d)", workdir / "checkpoints", start_step, position)
  else:
    model, _ = create_sharded_module(constructor, mesh, rules)
    state = jax.jit(lambda p: init_train_state(p, tx, config.seed), out_shardings=state_sh)(nnx.state(model))
    del model

  # ------------------------------------------------------------------ data iterators
  seq_shards = mesh.shape.get("sequence", 1)
  layout = None
  if seq_shards > 1:
    from parallel.layouts import LAYOUTS
    layout = LAYOUTS[t.sequence_layout][0]
  data_sh = batch_sharding(mesh, rules)
  accum, micro = t.grad_accum, t.batch_size // t.grad_accum
  batch_shape, eval_shape = (accum, micro, t.seq_len), (1, micro, t.seq_len)
  rows = _local_rows(data_sh, batch_shape)
  iterator = BatchIterator(ds.train, t.batch_size, accum, seed=config.data.seed, position=position,
                           local_rows=rows, layout=layout, layout_shards=seq_shards)
  # eval_batches counts batches of batch_size rows, run as micro-batches (the compiled eval shape)
  held_out = eval_batches(ds.eval, micro, t.eval_batches * accum, local_rows=rows, layout=layout,
                          layout_shards=seq_shards) if ds.eval.num_rows else []

  def to_device(batch, shape):
    return {k: jax.make_array_from_process_local_data(data_sh, v, shape) for k, v in batch.items()}

  # ------------------------------------------------------------------ compile
  log.info("mesh %s over %d devices (%d processes); model %s, %.2fM params; batch %d x %d tokens, grad_accum %d, "
           "remat %s", mesh_summary(mesh), mesh.size, jax.process_count(), cfg.model_type,
           sum(math.prod(s) for s in shapes.values()) / 1e6, t.batch_size, t.seq_len, accum, t.remat)
  end_step = min(t.steps, t.stop_after) if t.stop_after else t.steps
  compile_s = 0.0
  if start_step < end_step:
    compile_start = time.perf_counter()
    train_fn, eval_fn = task.compile(step_graphdef, tx, abstract_state, state_sh, batch_shape, eval_shape, mesh,
                                     rules)
    compile_s = time.perf_counter() - compile_start
    log.info("compiled train and eval steps in %.1fs", compile_s)
  else:
    log.info("the checkpoint is already at step %d of %d: nothing to train", start_step, end_step)
  flops_per_token = task.flops_per_token(cfg, t.seq_len)
  peak, peak_note = peak_flops_per_device(override=t.peak_flops_per_device)
  if leader:
    print(f"[jaxinfer train] MFU assumes {peak_note}", flush=True)

  def evaluate(params) -> dict:
    """The task's held-out record ({} without a held-out split)."""
    if not held_out:
      return {}
    return task.evaluate(eval_fn, params, (to_device(b, eval_shape) for b in held_out))

  meta_base = {"model": dataclasses.asdict(cfg), "param_shapes": shapes, "config": _config_json(config),
               **task.meta()}
  kill_at = int(os.environ.get(FAULT_ENV, "0") or 0)
  metrics = MetricsLog(workdir / "metrics.jsonl", resume_step=start_step, enabled=leader)
  losses: dict[int, float] = {}
  eval_loss = None
  tokens_per_step = t.batch_size * t.seq_len
  bar = None
  if leader and t.progress:
    from tqdm.auto import tqdm
    bar = tqdm(total=end_step, initial=min(start_step, end_step), desc=config.name, unit="step",
               dynamic_ncols=True)
  train_start = time.perf_counter()
  try:
    next_batch = to_device(next(iterator), batch_shape) if start_step < end_step else None
    last = time.perf_counter()
    for step in range(start_step + 1, end_step + 1):
      state, m = train_fn(state, next_batch)
      checkpointer.poll()  # an asynchronous save that failed stops the run here, naming the path and cause
      if step < end_step:
        next_batch = to_device(next(iterator), batch_shape)  # overlaps with the step running on the devices
      m = jax.device_get(m)
      now = time.perf_counter()
      dt, last = now - last, now
      tps = tokens_per_step / dt
      record = {"step": step, "loss": float(m["loss"]), "grad_norm": float(m["grad_norm"]),
                "learning_rate": float(schedule(step - 1)), "tokens_per_sec": tps,
                "mfu": flops_per_token * tps / (peak * mesh.size) if peak else None,
                "step_time_s": dt, "loss_tokens": int(m["loss_tokens"]),
                "epoch": (position + step - start_step) * t.batch_size / ds.train.num_rows}
      record.update(task.step_record(m))
      if not math.isfinite(record["loss"]):
        raise FloatingPointError(f"loss is {record['loss']} at step {step}; lower train.learning_rate")
      if (t.eval_every and step % t.eval_every == 0) or step == end_step:
        evaluation = evaluate(state["params"])
        eval_loss = evaluation.get("eval_loss")
        record.update(evaluation)
        last = time.perf_counter()  # eval time is not training throughput
      losses[step] = record["loss"]
      metrics.write(record)
      if bar is not None:
        bar.set_postfix(loss=f"{record['loss']:.3f}", tok_s=f"{tps:,.0f}", refresh=False)
        bar.update(1)
      if (t.checkpoint_every and step % t.checkpoint_every == 0) or step == end_step:
        # batches consumed by the steps so far (the iterator itself is one ahead: it prefetched the next batch)
        consumed = position + (step - start_step)
        checkpointer.save(step, state, dict(meta_base, step=step, data_position=consumed))
        if kill_at == step:
          os.kill(os.getpid(), signal.SIGKILL)
        last = time.perf_counter()
  finally:
    if bar is not None:
      bar.close()
    metrics.close()
    checkpointer.close()
  train_s = time.perf_counter() - train_start

  # ------------------------------------------------------------------ export, samples, report
  final_step = max(start_step, end_step)
  finished = final_step >= t.steps
  host_params = _to_host(state["params"])
  trained = nnx.merge(graphdef, host_params)
  samples = task.finish(RunEnd(config, cfg, mesh, workdir, ds, trained, finished, leader, compile_s, train_s,
                               peak_note, flops_per_token, sum(math.prod(s) for s in shapes.values()), param_sh,
                               evaluate if start_step < end_step else None))
  _barrier("jaxinfer_train_done")
  return TrainResult(workdir, start_step, final_step, losses, eval_loss, ds.stats, samples)


def sample_continuations(model, tokenizer, prompts, max_new_tokens, temperature, top_k, seed, eos):
  from jaxinfer.generation import SamplingParams, generate

  ids = [tokenizer.encode(p).ids for p in prompts]
  limit = model.config.max_position_embeddings - max_new_tokens
  ids = [i[-limit:] if len(i) > limit else i for i in ids]
  sampling = SamplingParams(temperature=temperature, top_k=top_k, seed=seed)
  outs = generate(model, ids, max_new_tokens, sampling=sampling, stop_token_ids=(eos,) if eos is not None else ())
  return [(p, tokenizer.decode([t for t in out if t != eos])) for p, out in zip(prompts, outs)]


def _write_report(config, cfg, mesh, workdir, records, stats, samples, compile_s, train_s, peak_note,
                  flops_per_token, num_params):
  train_records = [r for r in records if "loss" in r]
  evals = [r for r in records if "eval_loss" in r]
  steady = train_records[1:] or train_records
  last_losses = [r["loss"] for r in train_records[-10:]]
  entropy = stats.get("unigram_entropy_nats")
  plot_losses(records, workdir / "loss_curve.png", entropy, title=f"{config.name}: {cfg.model_type} "
              f"{cfg.num_layers}x{cfg.hidden_size}, vocab {cfg.vocab_size}")
  median = lambda key: statistics.median(r[key] for r in steady if r.get(key) is not None) if steady and any(
      r.get(key) is not None for r in steady) else None
  rows = [
      ("steps", train_records[-1]["step"] if train_records else 0),
      ("tokens seen", (train_records[-1]["step"] if train_records else 0) * config.train.batch_size
       * config.train.seq_len),
      ("parameters", num_params),
      ("mesh", mesh_summary(mesh)),
      ("first train loss (nats/token)", train_records[0]["loss"] if train_records else None),
      ("final train loss, mean of last 10 steps", sum(last_losses) / len(last_losses) if last_losses else None),
      ("final held-out loss", evals[-1]["eval_loss"] if evals else None),
      ("final held-out perplexity", evals[-1]["eval_perplexity"] if evals else None),
      ("corpus unigram entropy (nats/token)", entropy),
      ("corpus unigram entropy (bits/token)", stats.get("unigram_entropy_bits")),
      ("train tokens in corpus", stats.get("train_tokens")),
      ("epochs", train_records[-1].get("epoch") if train_records else None),
      ("median tokens/s", median("tokens_per_sec")),
      ("median MFU", median("mfu")),
      ("model FLOPs per token (train)", flops_per_token),
      ("compile time (s)", compile_s),
      ("training wall time this run (s)", train_s),
  ]
  notes = [f"MFU assumes {peak_note}.", f"Device: {jax.devices()[0].device_kind}, {jax.device_count()} device(s), "
           f"JAX {jax.__version__}.", "Losses are natural-log cross entropy per token; the unigram entropy is the "
           "loss of the best context-free model of this corpus's training split."]
  write_results(workdir / "results.md", f"{config.name}: training results", rows, samples, notes)
