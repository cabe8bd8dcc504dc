"""Where training text comes from: files, globs, directories, JSONL, or the Python standard library's source.

A document is one text file, or one record of a .jsonl file (the `data.jsonl_field` of each line). The default
corpus (empty `data.paths`) is the standard library's own .py tree of the running interpreter, found with
sysconfig at run time, so every machine has it without a download.
"""

from __future__ import annotations

import glob
import json
import os
import sysconfig
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from jaxinfer.config import ConfigError

SKIP_DIRS = {"site-packages", "dist-packages", "__pycache__", ".git"}


def stdlib_root() -> Path:
  """The directory holding the running interpreter's standard library (.py files)."""
  root = sysconfig.get_paths().get("stdlib") or os.path.dirname(os.__file__)
  return Path(root)


def _walk(root: Path, extensions: Sequence[str]) -> Iterator[Path]:
  for directory, subdirs, files in os.walk(root):
    subdirs[:] = sorted(d for d in subdirs if d not in SKIP_DIRS)
    for name in sorted(files):
      if name.endswith(tuple(extensions)):
        yield Path(directory) / name


def list_files(paths: Sequence[str], extensions: Sequence[str]) -> list[Path]:
  """Files named by `paths` (files, glob patterns, directories walked recursively), sorted and de-duplicated.

  Empty `paths` means the standard library's .py tree. A path that matches nothing raises ConfigError.
  """
  if not paths:
    return sorted(_walk(stdlib_root(), (".py",)))
  found: set[Path] = set()
  for i, pattern in enumerate(paths):
    pattern = os.path.expanduser(str(pattern))
    matches = sorted(glob.glob(pattern, recursive=True)) if glob.has_magic(pattern) else [pattern]
    hits = 0
    for match in matches:
      p = Path(match)
      if p.is_dir():
        for f in _walk(p, extensions):
          found.add(f)
          hits += 1
      elif p.is_file():
        found.add(p)
        hits += 1
    if not hits:
      raise ConfigError(f"data.paths[{i}]: {pattern!r} matches no readable file"
                        + (f" with extension {', '.join(extensions)}" if matches else ""))
  return sorted(found)


def select_files(files: Sequence[Path], max_bytes: int, seed: int) -> list[Path]:
  """A seeded sample of files totalling at most max_bytes (0: all); returned in sorted order."""
  if max_bytes <= 0:
    return list(files)
  order = np.random.default_rng(seed).permutation(len(files))
  chosen, total = [], 0
  for i in order:
    size = files[i].stat().st_size
    if size == 0 or total + size > max_bytes:
      continue
    chosen.append(files[i])
    total += size
  return sorted(chosen)


def read_documents(files: Sequence[Path], jsonl_field: str = "text") -> tuple[list[str], dict[str, int]]:
  """All documents of the files, in order, and counts of what was skipped (undecodable / empty / no field)."""
  docs: list[str] = []
  skipped = {"undecodable": 0, "empty": 0, "no_field": 0}
  for path in files:
    try:
      text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
      skipped["undecodable"] += 1
      continue
    if path.suffix == ".jsonl":
      for line_no, line in enumerate(text.splitlines(), 1):
        if not line.strip():
          continue
        try:
          record = json.loads(line)
        except json.JSONDecodeError as e:
          raise ConfigError(f"data.paths: {path}:{line_no} is not valid JSON ({e})") from None
        value = record.get(jsonl_field) if isinstance(record, dict) else None
        if not isinstance(value, str):
          skipped["no_field"] += 1
        elif value.strip():
          docs.append(value)
        else:
          skipped["empty"] += 1
    elif text.strip():
      docs.append(text)
    else:
      skipped["empty"] += 1
  return docs, skipped


def fingerprint_files(files: Sequence[Path]) -> list[tuple[str, int, int]]:
  """(path, size, mtime_ns) of each file: what a cache key must change with."""
  out = []
  for f in files:
    st = f.stat()
    out.append((str(f.resolve()), st.st_size, st.st_mtime_ns))
  return out
