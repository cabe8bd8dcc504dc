"""What a training run leaves in its workdir besides checkpoints: metrics.jsonl, loss_curve.png, results.md.

Written with the one results writer (jaxinfer/experiments/results.py): MetricsLog and read_metrics are its own;
plot_losses and write_results are the training run's plot and table, saved through it (temporary name, then
rename).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from jaxinfer.experiments.results import MetricsLog, fmt, markdown_table, pyplot, read_metrics, save_figure, write_text

__all__ = ["MetricsLog", "plot_losses", "read_metrics", "write_results"]


def plot_losses(records: Sequence[dict], path: Path, entropy_nats: float | None = None, title: str = "") -> Path:
  plt = pyplot()
  steps = [r["step"] for r in records if "loss" in r]
  losses = [r["loss"] for r in records if "loss" in r]
  evals = [(r["step"], r["eval_loss"]) for r in records if "eval_loss" in r]
  fig, ax = plt.subplots(figsize=(7, 4.2))
  ax.plot(steps, losses, lw=1.2, label="train loss")
  if evals:
    ax.plot(*zip(*evals), "o-", ms=4, label="held-out loss")
  if entropy_nats:
    ax.axhline(entropy_nats, color="grey", ls="--", lw=1, label=f"unigram entropy {entropy_nats:.2f}")
  ax.set(xlabel="step", ylabel="cross entropy (nats / token)", title=title)
  ax.grid(alpha=0.3)
  ax.legend()
  return save_figure(fig, path, dpi=110)


def write_results(path: Path, title: str, rows: Sequence[tuple[str, Any]], samples: Sequence[tuple[str, str]],
                  notes: Sequence[str] = ()) -> Path:
  lines = [f"# {title}", "", markdown_table(["quantity", "value"], [(name, fmt(value)) for name, value in rows])]
  if notes:
    lines += [""] + [f"- {n}" for n in notes]
  if samples:
    lines += ["", "## Samples", ""]
    for prompt, text in samples:
      lines += [f"Prompt `{prompt!r}`:", "", "```python", prompt + text, "```", ""]
  return write_text(path, "\n".join(lines) + "\n")
