"""Atomic file writes: write under a temporary name in the target's folder, then rename over the target.

A reader (or a run killed mid-write) sees either the old file or the whole new one, never half of it.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Callable


def write_atomic(target: str | os.PathLike, write: Callable[[str], None]) -> None:
  """Calls write(tmp_path), then renames tmp_path over target; the temporary file is removed on failure."""
  target = Path(target)
  target.parent.mkdir(parents=True, exist_ok=True)
  fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
  os.close(fd)
  try:
    write(tmp)
    os.replace(tmp, target)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise


def write_text_atomic(target: str | os.PathLike, text: str) -> None:
  write_atomic(target, lambda tmp: Path(tmp).write_text(text))
