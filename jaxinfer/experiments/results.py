"""The one results writer: what a run leaves behind, always written to a temporary name and then renamed.

Experiment runs (`jaxinfer run`) write a run folder, `<workdir>/<run_name>/`, where `workdir` is the config's
top-level `results/<experiment>` (made absolute when the config is loaded) and `run_name` a top-level config
field, "default" unless set (`--config.run_name=load0.8`). The folder holds

  resolved_config.json   the config after overrides and path resolution (enough to run it again)
  metrics.jsonl          one JSON object per line: first {"kind": "environment", ...}, then the driver's rows
  results.md             the driver's tables and notes
  *.png                  plots (matplotlib, Agg backend)

While the run is going, all of it is written into `<workdir>/<run_name>.partial/` (metrics.jsonl line by
line, so a long run shows its progress); when the driver returns, that folder replaces `<run_name>/` in one
rename. A run that fails leaves its `.partial` folder for inspection and the previous run folder untouched.

Training runs write their workdir themselves (checkpoints, resume), through the same pieces: `MetricsLog`,
`read_metrics`, `write_text`, `save_figure`, `markdown_table` (jaxinfer/train/report.py).
"""

from __future__ import annotations

import contextlib
import datetime
import json
import math
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any, Iterator, Sequence

DEFAULT_RUN_NAME = "default"


# ------------------------------------------------------------------------------------------ atomic files


def write_text(path: str | os.PathLike, text: str) -> Path:
  """Write `text` to `path` through a temporary file in the same folder, then rename it into place."""
  path = Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.with_name(path.name + ".tmp")
  tmp.write_text(text)
  os.replace(tmp, path)
  return path


def write_json(path: str | os.PathLike, value: Any) -> Path:
  return write_text(path, json.dumps(value, indent=2, default=_jsonable) + "\n")


def save_figure(fig, path: str | os.PathLike, dpi: int = 120) -> Path:
  """Save a matplotlib figure as PNG through a temporary name, and close it."""
  import matplotlib.pyplot as plt

  path = Path(path)
  tmp = path.with_name(path.stem + ".tmp.png")
  fig.tight_layout()
  fig.savefig(tmp, dpi=dpi)
  plt.close(fig)
  os.replace(tmp, path)
  return path


def pyplot():
  """matplotlib.pyplot on the Agg backend (no display needed)."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  return plt


def _jsonable(value):
  if hasattr(value, "tolist"):  # numpy scalars and arrays
    return value.tolist()
  if isinstance(value, (set, frozenset, tuple)):
    return list(value)
  return str(value)


# ------------------------------------------------------------------------------------------ metrics.jsonl


class MetricsLog:
  """Appends one JSON object per line to a metrics.jsonl file, flushed after every line.

  `resume_step` > 0 (a training run resumed from that step): lines of later steps, written by the interrupted
  run after its last checkpoint, are dropped first, so the file always describes one consistent run.
  """

  def __init__(self, path: str | os.PathLike, resume_step: int = 0, enabled: bool = True):
    self.path, self.enabled = Path(path), enabled
    if not enabled:
      return
    kept = [r for r in read_metrics(self.path) if r.get("step", 0) <= resume_step] if resume_step else []
    write_text(self.path, "".join(json.dumps(r, default=_jsonable) + "\n" for r in kept))
    self._file = open(self.path, "a")

  def write(self, record: dict[str, Any]) -> None:
    if self.enabled:
      self._file.write(json.dumps(record, default=_jsonable) + "\n")
      self._file.flush()

  def close(self) -> None:
    if self.enabled and not self._file.closed:
      self._file.close()


def read_metrics(path: str | os.PathLike) -> list[dict[str, Any]]:
  """The records of a metrics.jsonl file; stops at a line cut short by a kill (everything after is suspect)."""
  path = Path(path)
  if not path.is_file():
    return []
  out = []
  for line in path.read_text().splitlines():
    try:
      out.append(json.loads(line))
    except json.JSONDecodeError:
      break
  return out


# ------------------------------------------------------------------------------------------ tables


def fmt(value, spec: str | None = None) -> str:
  """A table cell: `spec` is a format spec ('.1f') or a format string ('{:.2f}x'); floats default to 4
  significant digits."""
  if value is None:
    return "-"
  if spec is not None:
    return spec.format(value) if "{" in spec else format(value, spec)
  if isinstance(value, float):
    if math.isnan(value):
      return "nan"
    return f"{value:.4g}" if abs(value) < 1e5 else f"{value:.3e}"
  return str(value)


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
  """A GitHub markdown table; cells are str()'d as given (format them with `fmt` first)."""
  lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
  return "\n".join(lines)


def table_from(rows: Sequence[dict], columns: Sequence[tuple[str, str, str | None]]) -> str:
  """A markdown table of dict rows: columns are (header, key, format spec or None)."""
  return markdown_table([c[0] for c in columns], [[fmt(r.get(key), spec) for _, key, spec in columns]
                                                  for r in rows])


# ------------------------------------------------------------------------------------------ environment


def environment() -> dict[str, Any]:
  """Where and when a run was measured: date, commit, jax version, backend, devices, CPU count."""
  import jax

  devices = jax.devices()
  return dict(date=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
              commit=_commit(), jax=jax.__version__, backend=jax.default_backend(),
              device_kind=devices[0].device_kind, devices=len(devices), cpu_count=os.cpu_count())


def describe(env: dict[str, Any]) -> str:
  return (f"{env['date']}, commit {env['commit']}, jax {env['jax']}, backend {env['backend']} "
          f"({env['devices']} x {env['device_kind']}, {env['cpu_count']} CPU cores)")


def _commit() -> str:
  root = Path(__file__).resolve().parents[2]
  try:
    head = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"], capture_output=True,
                          text=True, timeout=10).stdout.strip()
    dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                           capture_output=True, text=True, timeout=10).stdout.strip()
  except (OSError, subprocess.SubprocessError):
    return "unknown"
  return (head + ("+dirty" if dirty else "")) if head else "unknown"


# ------------------------------------------------------------------------------------------ the run folder


class Run:
  """An open run folder (see the module docstring): `log` rows, add `section`s of results.md, `figure`s."""

  def __init__(self, name: str, final_dir: Path, env: dict[str, Any]):
    self.name, self.final_dir, self.env = name, final_dir, env
    self.dir = final_dir.with_name(final_dir.name + ".partial")
    if self.dir.exists():
      shutil.rmtree(self.dir)
    self.dir.mkdir(parents=True)
    self.metrics = MetricsLog(self.dir / "metrics.jsonl")
    self.metrics.write(dict(kind="environment", **env))
    self._markdown = [f"# {name}", "", f"Measured {describe(env)}.", ""]

  def log(self, kind: str, **row) -> None:
    """One row of metrics.jsonl, tagged with the part of the experiment it belongs to."""
    self.metrics.write(dict(kind=kind, **row))

  def section(self, title: str, *paragraphs: str) -> None:
    """A `## title` section of results.md: paragraphs (text or tables) separated by blank lines."""
    self._markdown += [f"## {title}", ""]
    for p in paragraphs:
      self._markdown += [p, ""]

  def figure(self, fig, name: str, dpi: int = 120) -> Path:
    return save_figure(fig, self.dir / name, dpi=dpi)

  @property
  def markdown(self) -> str:
    return "\n".join(self._markdown).rstrip() + "\n"

  def _finish(self, config) -> None:
    self.metrics.close()
    write_text(self.dir / "results.md", self.markdown)
    write_json(self.dir / "resolved_config.json", config.to_dict() if hasattr(config, "to_dict") else config)
    old = self.final_dir.with_name(self.final_dir.name + ".old")
    if old.exists():
      shutil.rmtree(old)
    if self.final_dir.exists():
      os.replace(self.final_dir, old)
    os.replace(self.dir, self.final_dir)
    shutil.rmtree(old, ignore_errors=True)
    self.dir = self.final_dir


def run_dir(config) -> Path:
  """`<workdir>/<run_name>` of an experiment config."""
  from jaxinfer.config import require

  require(bool(config.get("workdir")), "workdir", "an experiment needs a results folder, e.g. results/<name>")
  name = config.get("run_name") or DEFAULT_RUN_NAME
  require("/" not in name and name not in (".", ".."), "run_name", f"must be a plain folder name, got {name!r}")
  return Path(config.workdir) / name


@contextlib.contextmanager
def open_run(config) -> Iterator[Run]:
  """The run folder of `config`; written under `<run>.partial/` and renamed to `<run>/` when the block ends."""
  run = Run(config.get("name", "experiment"), run_dir(config), environment())
  try:
    yield run
  except BaseException:
    run.metrics.close()
    print(f"run failed: what it wrote is in {run.dir}", flush=True)
    raise
  run._finish(config)
  print(f"wrote {run.dir}: " + ", ".join(sorted(p.name for p in run.dir.iterdir())), flush=True)
