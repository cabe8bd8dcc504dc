"""What a Medusa-heads run writes besides checkpoints: results.md (per-head held-out top-1 / top-3 accuracy,
the number the Medusa paper reports per head), loss_curve.png and head_accuracy.png, through the shared
results writer."""

from __future__ import annotations

import statistics

import jax
import numpy as np

from jaxinfer.experiments.results import fmt, markdown_table, pyplot, save_figure, write_text
from jaxinfer.train.report import plot_losses


def unigram_accuracy(dataset, vocab_size: int) -> dict[str, float]:
  """Top-1 / top-3 accuracy on the held-out tokens of always guessing the training split's most frequent
  token(s): the context-free baseline the heads must beat."""
  counts = np.bincount(np.asarray(dataset.train.tokens, np.int64), minlength=vocab_size)
  top = np.argsort(-counts, kind="stable")[:3]
  held_out = np.asarray(dataset.eval.tokens, np.int64)
  if held_out.size == 0:
    return {}
  return {"top1": float(np.mean(held_out == top[0])), "top3": float(np.mean(np.isin(held_out, top)))}


def plot_head_accuracy(records, path, num_heads: int, unigram: dict, untrained: dict, title: str):
  """Held-out top-1 accuracy per head against the step (step 0: the untrained heads, lm_head copies)."""
  plt = pyplot()
  fig, ax = plt.subplots(figsize=(8.6, 4.2))
  for k in range(num_heads):
    start = [(0, untrained[f"eval_top1_head{k}"])] if f"eval_top1_head{k}" in untrained else []
    points = start + [(r["step"], r[f"eval_top1_head{k}"]) for r in records if f"eval_top1_head{k}" in r]
    if points:
      ax.plot(*zip(*points), "o-", ms=3, label=f"head {k} (token t+{k + 2})")
  base = [(r["step"], r["eval_top1_base"]) for r in records if "eval_top1_base" in r]
  if base:
    ax.plot(*zip(*base), "k--", lw=1, label="base lm_head (token t+1)")
  if unigram:
    ax.axhline(unigram["top1"], color="grey", ls=":", lw=1, label=f"unigram {unigram['top1']:.3f}")
  ax.set(xlabel="step", ylabel="held-out top-1 accuracy", title=title, ylim=(0, None))
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))  # outside: the curves fill the axes
  return save_figure(fig, path, dpi=110)


def write_medusa_report(task, end, records, untrained: dict, unigram: dict):
  config, cfg, workdir, m = end.config, end.cfg, end.workdir, task.section
  train_records = [r for r in records if "loss" in r]
  evals = [r for r in records if "eval_loss" in r]
  last = evals[-1] if evals else {}
  title = f"{config.name}: {m.num_heads} Medusa heads on {cfg.model_type} {cfg.num_layers}x{cfg.hidden_size}"
  plot_losses(records, workdir / "loss_curve.png", None, title=title + " (sum_k lambda_k L_k)")
  plot_head_accuracy(records, workdir / "head_accuracy.png", m.num_heads, unigram, untrained, title)

  heads = []
  for k in range(m.num_heads):
    heads.append((f"head {k}", f"t+{k + 2}", fmt(m.decay_coefficient ** k), fmt(untrained.get(f"eval_top1_head{k}")),
                  fmt(last.get(f"eval_top1_head{k}")), fmt(untrained.get(f"eval_top3_head{k}")),
                  fmt(last.get(f"eval_top3_head{k}")), fmt(untrained.get(f"eval_loss_head{k}")),
                  fmt(last.get(f"eval_loss_head{k}"))))
  head_table = markdown_table(["head", "predicts", "lambda", "top-1 untrained", "top-1", "top-3 untrained",
                               "top-3", "loss untrained", "loss"], heads)
  steady = train_records[1:] or train_records
  speeds = [r["tokens_per_sec"] for r in steady if r.get("tokens_per_sec") is not None]
  step = train_records[-1]["step"] if train_records else 0
  rows = [
      ("steps", step),
      ("tokens seen", step * config.train.batch_size * config.train.seq_len),
      ("head parameters (trained)", end.num_params),
      ("base", m.base_dir),
      ("heads file", str(task.output_dir) if end.finished and task.t.export_hf else "not written"),
      ("base lm_head next-token top-1 (held out)", last.get("eval_top1_base")),
      ("unigram baseline top-1 / top-3 (held out)",
       f"{fmt(unigram.get('top1'))} / {fmt(unigram.get('top3'))}" if unigram else None),
      ("first train loss", train_records[0]["loss"] if train_records else None),
      ("final held-out loss", last.get("eval_loss")),
      ("held-out loss of the untrained heads", untrained.get("eval_loss")),
      ("median tokens/s", statistics.median(speeds) if speeds else None),
      ("compile time (s)", end.compile_s),
      ("training wall time this run (s)", end.train_s),
  ]
  notes = [
      "Head k reads the base's final hidden state at position t and predicts token t+k+2 (the base lm_head "
      "predicts t+1); untrained heads are copies of the lm_head (init_from_base).",
      "Accuracies are over the held-out documents (data.eval_fraction, the base's own split when the data "
      f"section matches the base's), {config.train.eval_batches} batches; a target counts only inside its "
      "document.",
      "Losses are natural-log cross entropy per token; the run's loss is sum_k lambda_k L_k, "
      f"lambda_k = {m.decay_coefficient}^k.",
      f"Device: {jax.devices()[0].device_kind}, {jax.device_count()} device(s), JAX {jax.__version__}.",
  ]
  lines = [f"# {config.name}: Medusa-1 heads", "", "## Held-out accuracy per head", "", head_table, "",
           markdown_table(["quantity", "value"], [(name, fmt(value)) for name, value in rows]), ""]
  lines += [f"- {n}" for n in notes]
  return write_text(workdir / "results.md", "\n".join(lines) + "\n")
