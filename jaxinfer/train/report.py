"""What a run leaves in its workdir besides checkpoints: metrics.jsonl, loss_curve.png, results.md."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, Sequence


class MetricsLog:
  """Appends one JSON object per line to <workdir>/metrics.jsonl.

  On resume from step s, lines of steps > s (written by the interrupted run after its last checkpoint) are
  dropped first, so the file always describes one consistent run.
  """

  def __init__(self, path: Path, resume_step: int = 0, enabled: bool = True):
    self.path, self.enabled = Path(path), enabled
    if not enabled:
      return
    kept = [r for r in read_metrics(self.path) if r.get("step", 0) <= resume_step] if resume_step else []
    tmp = self.path.with_suffix(".jsonl.tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in kept))
    os.replace(tmp, self.path)
    self._file = open(self.path, "a")

  def write(self, record: dict[str, Any]) -> None:
    if self.enabled:
      self._file.write(json.dumps(record) + "\n")
      self._file.flush()

  def close(self) -> None:
    if self.enabled:
      self._file.close()


def read_metrics(path: Path) -> list[dict[str, Any]]:
  path = Path(path)
  if not path.is_file():
    return []
  out = []
  for line in path.read_text().splitlines():
    try:
      out.append(json.loads(line))
    except json.JSONDecodeError:
      break  # a line cut by a kill: everything after it is suspect
  return out


def plot_losses(records: Sequence[dict], path: Path, entropy_nats: float | None = None, title: str = "") -> Path:
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  steps = [r["step"] for r in records if "loss" in r]
  losses = [r["loss"] for r in records if "loss" in r]
  evals = [(r["step"], r["eval_loss"]) for r in records if "eval_loss" in r]
  fig, ax = plt.subplots(figsize=(7, 4.2))
  ax.plot(steps, losses, lw=1.2, label="train loss")
  if evals:
    ax.plot(*zip(*evals), "o-", ms=4, label="held-out loss")
  if entropy_nats:
    ax.axhline(entropy_nats, color="grey", ls="--", lw=1, label=f"unigram entropy {entropy_nats:.2f}")
  ax.set_xlabel("step")
  ax.set_ylabel("cross entropy (nats / token)")
  ax.set_title(title)
  ax.grid(alpha=0.3)
  ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)
  return path


def _fmt(value) -> str:
  if value is None:
    return "-"
  if isinstance(value, float):
    if math.isnan(value):
      return "nan"
    return f"{value:.4g}" if abs(value) < 1e5 else f"{value:.3e}"
  return str(value)


def write_results(path: Path, title: str, rows: Sequence[tuple[str, Any]], samples: Sequence[tuple[str, str]],
                  notes: Sequence[str] = ()) -> Path:
  lines = [f"# {title}", "", "| quantity | value |", "|---|---|"]
  lines += [f"| {name} | {_fmt(value)} |" for name, value in rows]
  if notes:
    lines += [""] + [f"- {n}" for n in notes]
  if samples:
    lines += ["", "## Samples", ""]
    for prompt, text in samples:
      lines += [f"Prompt `{prompt!r}`:", "", "```python", prompt + text, "```", ""]
  tmp = Path(str(path) + ".tmp")
  tmp.write_text("\n".join(lines) + "\n")
  os.replace(tmp, path)
  return path
