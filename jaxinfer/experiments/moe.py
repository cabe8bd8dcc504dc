"""Driver: a dense model and an MoE with the same active parameters per token, trained on the same tokens.

Config: experiments/moe.py (section `moe`, MoEExperimentConfig below, and `data`, the stdlib corpus).

  dense   SwiGLU MLP of width `ffn`                                     (active MLP params 3 d ffn)
  moe     `num_experts` SwiGLU experts of width ffn / top_k, top_k routed (active MLP params 3 d ffn + router)

Both are trained by jaxinfer.train.trainer.train with the same data, seed, batch, schedule and steps (each in
its own workdir under the run folder). Measured and written:
  - held-out loss against step and against training FLOPs (active parameters: 6 x matmul params per token
    plus attention; the router's d x E is counted, the top-k / sort / scatter are not FLOPs of a matmul);
  - the per-layer expert load (fraction of the assignments each expert got) over training, as heatmaps;
  - assignments dropped and the held-out loss against the capacity factor (the trained MoE, re-run with
    capacity_factor = each value; 0 is dropless);
  - all-to-all bytes per train step against the expert-axis size, read from the compiled HLO of the
    expert-parallel train step (per device; axes up to the device count, data taking the rest).
"""

from __future__ import annotations

import dataclasses
import math
import re
from pathlib import Path

import numpy as np

from jaxinfer.experiments import results
from jaxinfer.experiments.sections import check, read
from jaxinfer.train.flops import train_flops_per_token  # counts only the active experts of MoE layers


@dataclasses.dataclass(frozen=True)
class MoEExperimentConfig:
  SECTION = "moe"
  vocab_size: int = 2048
  hidden_size: int = 128
  ffn: int = 512  # dense MLP width; each expert gets ffn // top_k
  num_layers: int = 2
  num_heads: int = 4
  num_experts: int = 8
  top_k: int = 2
  steps: int = 150
  batch_size: int = 16
  seq_len: int = 128
  learning_rate: float = 3e-3
  eval_every: int = 25
  eval_batches: int = 4
  router_aux_loss_coef: float = 0.01
  router_z_loss_coef: float = 0.001
  capacity_factors: tuple[float, ...] = (0.0, 0.5, 0.75, 1.0, 1.25, 1.5, 2.0)
  expert_axes: tuple[int, ...] = (1, 2, 4, 8)

  def __post_init__(self):
    cls = type(self)
    for name in ("vocab_size", "hidden_size", "ffn", "num_layers", "num_heads", "num_experts", "top_k", "steps",
                 "batch_size", "seq_len", "eval_every", "eval_batches"):
      value = getattr(self, name)
      check(cls, name, isinstance(value, int) and value >= 1, f"must be a positive integer, got {value!r}")
    check(cls, "top_k", self.top_k <= self.num_experts and self.ffn % self.top_k == 0,
          f"must be <= num_experts and divide ffn={self.ffn}, got {self.top_k}")
    check(cls, "capacity_factors", all(c >= 0 for c in self.capacity_factors), "must all be >= 0")
    check(cls, "expert_axes", all(isinstance(a, int) and a >= 1 for a in self.expert_axes), "must be >= 1")


SMOKE = dict(vocab_size=512, hidden_size=32, ffn=64, num_layers=1, num_heads=2, num_experts=4, steps=4,
             batch_size=8, seq_len=32, eval_every=2, eval_batches=1, capacity_factors=(0.0, 1.0),
             expert_axes=(1, 2))

CLAIMS = [
    ("Switch Transformer (Fedus et al.)", "at a fixed FLOPs per token, more experts (sparse parameters) lower the "
     "loss; Switch-Base (128 experts) reaches the T5-Base quality in 1/7 of the steps"),
    ("DeepSpeed-MoE (Rajbhandari et al.)", "an MoE with the active compute of a 1.3B dense model matches the "
     "quality of a 6.7B dense model (\"5x less training cost\" for the same quality)"),
]


def _model_fields(s: MoEExperimentConfig, moe: bool) -> dict:
  fields = dict(model_type="mixtral" if moe else "llama", vocab_size=s.vocab_size, hidden_size=s.hidden_size,
                intermediate_size=s.ffn, num_layers=s.num_layers, num_heads=s.num_heads, num_kv_heads=s.num_heads,
                max_position_embeddings=max(256, s.seq_len), param_dtype="float32", dtype="float32")
  if moe:
    fields.update(num_experts=s.num_experts, num_experts_per_tok=s.top_k, moe_intermediate_size=s.ffn // s.top_k,
                  router_aux_loss_coef=s.router_aux_loss_coef, router_z_loss_coef=s.router_z_loss_coef)
  return fields


def _train(config, s: MoEExperimentConfig, moe: bool, workdir: Path):
  from jaxinfer.config import mesh_section, model_section, train_section
  from jaxinfer.train.config import training_config
  from jaxinfer.train.trainer import train

  model = model_section(**_model_fields(s, moe))
  train_cfg = train_section(steps=s.steps, batch_size=s.batch_size, seq_len=s.seq_len,
                            learning_rate=s.learning_rate, warmup_steps=max(1, s.steps // 10), min_lr_ratio=0.1,
                            weight_decay=0.1, eval_every=s.eval_every, eval_batches=s.eval_batches,
                            checkpoint_every=s.steps, keep_checkpoints=1, sample_prompts=(), progress=False)
  cfg = training_config(f"moe-{'moe' if moe else 'dense'}", str(workdir), model, train_cfg, data=config.data,
                        mesh=mesh_section(data=-1), seed=config.seed)
  result = train(cfg)
  return result, results.read_metrics(workdir / "metrics.jsonl")


def _eval_rows(config, s: MoEExperimentConfig, hf_dir: Path, workdir: Path):
  from jaxinfer.data.dataset import DataConfig, prepare_dataset

  data = dataclasses.replace(read(config, DataConfig), tokenizer=str(hf_dir / "tokenizer.json"))
  ds = prepare_dataset(data, s.vocab_size, s.seq_len, workdir)
  n = min(ds.eval.num_rows, s.batch_size * s.eval_batches)
  return ds.eval.rows(np.arange(n))


def capacity_sweep(s: MoEExperimentConfig, hf_dir: Path, rows) -> list[dict]:
  """Held-out loss and dropped assignments of the trained MoE at each capacity factor."""
  import jax
  import jax.numpy as jnp
  from flax import nnx

  import jaxinfer
  from jaxinfer.models.moe import capture_moe_aux
  from jaxinfer.train.loss import next_token_nll

  out = []
  for cf in s.capacity_factors:
    model = jaxinfer.load_hf(hf_dir, capacity_factor=cf)
    graphdef, state = nnx.split(model)

    def fn(st, batch):
      logits, aux = capture_moe_aux(lambda m, *a: m(*a))(nnx.merge(graphdef, st), batch["inputs"],
                                                         batch["positions"], batch["segment_ids"])
      nll, count = next_token_nll(logits, batch["targets"], batch["loss_mask"])
      return nll, count, sum(a["dropped"] for a in aux)

    nll, count, dropped = jax.device_get(jax.jit(fn)(state, {k: jnp.asarray(v) for k, v in rows.items()}))
    assignments = rows["inputs"].size * s.top_k * sum(model.config.is_moe_layer(i) for i in range(s.num_layers))
    out.append(dict(capacity_factor=cf, eval_loss=float(nll / count), dropped=int(dropped),
                    dropped_pct=100.0 * float(dropped) / assignments))
  return out


_BYTES = {"f32": 4, "bf16": 2, "f16": 2, "s32": 4, "u32": 4, "s8": 1, "u8": 1, "pred": 1, "s64": 8, "f64": 8}


def all_to_all_bytes(hlo_text: str) -> tuple[int, int]:
  """(number of all-to-all ops, bytes of their results) in one device's compiled HLO module."""
  count, total = 0, 0
  for m in re.finditer(r"=\s*(.+?)\s+all-to-all\(", hlo_text):
    count += 1
    for dtype, dims in re.findall(r"(\w+)\[([\d,]*)\]", m.group(1)):
      total += _BYTES.get(dtype, 4) * math.prod(int(x) for x in dims.split(",") if x)
  return count, total


def a2a_sweep(s: MoEExperimentConfig) -> list[dict]:
  """All-to-all ops and bytes per device in the compiled expert-parallel train step (loss + gradients)."""
  import jax
  import jax.numpy as jnp
  from flax import nnx
  from jax.sharding import NamedSharding

  from jaxinfer.models.config import ModelConfig
  from jaxinfer.models.transformer import Transformer
  from jaxinfer.train.step import BATCH_FIELDS, batch_sharding, loss_and_grads
  from parallel.expert_parallel import expert_parallel
  from parallel.mesh import create_mesh
  from parallel.sharding import DEFAULT_RULES, state_shardings

  cfg = ModelConfig(**_model_fields(s, True))
  out = []
  for ep in s.expert_axes:
    n = jax.device_count()
    if ep > n or n % ep or s.num_experts % ep or s.batch_size % (n // ep):
      continue
    mesh = create_mesh(dict(expert=ep, data=n // ep))
    abstract = nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(abstract)
    shardings = state_shardings(state, DEFAULT_RULES, mesh)
    params = jax.tree.map(lambda a, sh: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sh), state, shardings)
    data_sh = batch_sharding(mesh, DEFAULT_RULES)
    batch = {k: jax.ShapeDtypeStruct((1, s.batch_size, s.seq_len), jnp.int32, sharding=data_sh)
             for k in BATCH_FIELDS}
    with expert_parallel(mesh):
      compiled = jax.jit(lambda p, b: loss_and_grads(graphdef, p, b)[:2],
                         out_shardings=(NamedSharding(mesh, jax.sharding.PartitionSpec()), shardings)).lower(
                             params, batch).compile()
    ops, nbytes = all_to_all_bytes(compiled.as_text())
    out.append(dict(expert_axis=ep, data_axis=n // ep, all_to_all_ops=ops, bytes_per_device=nbytes,
                    mb_per_device=nbytes / 2**20))
  return out


def _plots(run, curves: dict, loads: dict, sweep: list[dict], a2a: list[dict]) -> None:
  plt = results.pyplot()
  fig, axes = plt.subplots(1, 2, figsize=(10, 4))
  for name, c in curves.items():
    axes[0].plot(c["steps"], c["eval"], marker="o", label=name)
    axes[1].plot(c["flops"], c["eval"], marker="o", label=name)
  axes[0].set(xlabel="step", ylabel="held-out loss", title="held-out loss vs step")
  axes[1].set(xlabel="training FLOPs (active)", ylabel="held-out loss", title="vs training FLOPs", xscale="log")
  for ax in axes:
    ax.legend()
  run.figure(fig, "loss.png")
  if loads:
    fig, axes = plt.subplots(1, len(loads), figsize=(4.5 * len(loads), 3.5), squeeze=False)
    for ax, (layer, (steps, load)) in zip(axes[0], sorted(loads.items())):
      im = ax.imshow(np.asarray(load).T, aspect="auto", origin="lower", cmap="viridis",
                     extent=(steps[0] - 0.5, steps[-1] + 0.5, -0.5, len(load[0]) - 0.5))
      ax.set(xlabel="step", ylabel="expert", title=f"MoE layer {layer}: share of assignments")
      fig.colorbar(im, ax=ax)
    run.figure(fig, "expert_load.png")
  fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
  cf = [r["capacity_factor"] for r in sweep]
  axes[0].plot(cf, [r["dropped_pct"] for r in sweep], marker="o")
  axes[0].set(xlabel="capacity factor (0: dropless)", ylabel="assignments dropped (%)")
  axes[1].plot([r["expert_axis"] for r in a2a], [r["mb_per_device"] for r in a2a], marker="o")
  axes[1].set(xlabel="expert-axis size", ylabel="all-to-all MiB per device per step", xscale="log", xticks=[
      r["expert_axis"] for r in a2a], xticklabels=[str(r["expert_axis"]) for r in a2a])
  run.figure(fig, "capacity_and_all_to_all.png")


def run(config):
  from jaxinfer.models.config import ModelConfig

  s = read(config, MoEExperimentConfig, smoke=SMOKE)
  with results.open_run(config) as r:
    curves, loads, finals = {}, {}, {}
    for name, moe in (("dense", False), ("moe", True)):
      workdir = r.dir / name
      result, records = _train(config, s, moe, workdir)
      cfg = ModelConfig(**_model_fields(s, moe))
      fpt = train_flops_per_token(cfg, s.seq_len)
      evals = [x for x in records if "eval_loss" in x]
      curves[name] = dict(steps=[x["step"] for x in evals], eval=[x["eval_loss"] for x in evals],
                          flops=[x["step"] * s.batch_size * s.seq_len * fpt for x in evals])
      for x in evals:
        r.log("eval", variant=name, step=x["step"], eval_loss=x["eval_loss"],
              train_flops=x["step"] * s.batch_size * s.seq_len * fpt)
      train_rows = [x for x in records if "moe_expert_load" in x]
      for x in train_rows:
        r.log("expert_load", step=x["step"], load=x["moe_expert_load"], balance_loss=x["moe_balance_loss"],
              z_loss=x["moe_z_loss"])
      if train_rows:
        moe_layers = [i for i in range(s.num_layers) if cfg.is_moe_layer(i)]
        for j, layer in enumerate(moe_layers):
          loads[layer] = ([x["step"] for x in train_rows], [x["moe_expert_load"][j] for x in train_rows])
      finals[name] = dict(variant=name, total_params=cfg.num_params(), active_params=cfg.num_params(active=True),
                          train_flops_per_token=fpt, final_eval_loss=result.eval_loss,
                          final_train_loss=result.losses[max(result.losses)])
      r.log("final", **finals[name])
    rows = _eval_rows(config, s, r.dir / "moe" / "hf", r.dir / "moe")
    sweep = capacity_sweep(s, r.dir / "moe" / "hf", rows)
    for row in sweep:
      r.log("capacity", **row)
    a2a = a2a_sweep(s)
    for row in a2a:
      r.log("all_to_all", **row)
    _plots(r, curves, loads, sweep, a2a)
    gap = finals["dense"]["final_eval_loss"] - finals["moe"]["final_eval_loss"]
    r.section("Dense vs MoE at equal active parameters per token", results.table_from(list(finals.values()), [
        ("variant", "variant", None), ("total params", "total_params", ",d"), ("active params", "active_params", ",d"),
        ("train FLOPs / token", "train_flops_per_token", ".3g"), ("final held-out loss", "final_eval_loss", ".4f"),
        ("final train loss", "final_train_loss", ".4f")]),
        f"{s.num_experts} experts top-{s.top_k}, expert width {s.ffn // s.top_k} vs dense width {s.ffn}; same "
        f"data, seed, {s.steps} steps of {s.batch_size} x {s.seq_len} tokens. Held-out loss dense - MoE = "
        f"{gap:+.4f} (positive: the MoE is better). ![loss](loss.png)")
    last = {layer: np.asarray(v[1][-1]) for layer, v in loads.items()}
    r.section("Expert load", "Share of the top-k assignments per expert at the last step (uniform: "
              f"{1 / s.num_experts:.3f}): " + "; ".join(
                  f"layer {layer}: min {v.min():.3f}, max {v.max():.3f}" for layer, v in sorted(last.items()))
              + ". ![load](expert_load.png)")
    r.section("Tokens dropped against capacity factor", results.table_from(sweep, [
        ("capacity factor", "capacity_factor", ".2f"), ("dropped assignments", "dropped", "d"),
        ("dropped %", "dropped_pct", ".2f"), ("held-out loss", "eval_loss", ".4f")]),
        "The trained MoE evaluated with each capacity factor (0: dropless, the training setting).")
    r.section("All-to-all bytes per train step against the expert axis", results.table_from(a2a, [
        ("expert axis", "expert_axis", "d"), ("data axis", "data_axis", "d"), ("all-to-all ops", "all_to_all_ops", "d"),
        ("MiB per device", "mb_per_device", ".3f")]) if a2a else "no expert axis fits the devices",
        "From the compiled HLO of the expert-parallel loss-and-gradient step (padded all_to_all: each device "
        "sends ep buffers of local_tokens x k rows per MoE layer, forward and backward). "
        "![capacity and all-to-all](capacity_and_all_to_all.png)")
    r.section("Against the papers' claims", results.markdown_table(("paper", "claim"), CLAIMS))
  return 0
