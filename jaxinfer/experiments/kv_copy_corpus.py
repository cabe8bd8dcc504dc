"""A copy-rich training corpus for the kv_compression experiment's model: the quickstart's stdlib sample with
repetitions planted in every document, so that a small model learns in minutes to copy from far back (what
the retrieval probe asks), which plain stdlib text does not teach it in a CPU-sized run.

  python -m jaxinfer.experiments.kv_copy_corpus /tmp/kv_corpus      # then train with --config.data.paths=...

Each document (a stdlib file cut into pieces of about `piece` characters) gets, at random line breaks:
  - in its first half, `assignments` lines `<name> = <value>` (names from two word lists, values a number or an
    identifier of the file), and in its second half the same lines again, shuffled;
  - one span of 2-5 lines of the first half repeated in the second half.
The files the experiment evaluates on (its `files`, `calibration_file`) are left out, and the planted names
use words the probe never uses (kv_compression.PROBE_WORDS), so the probe's name/value pairs are never seen.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import numpy as np

FIRST = ("alpha", "bravo", "delta", "echo", "foxtrot", "golf", "hotel", "india", "kilo", "lima", "mike", "oscar",
         "papa", "romeo", "sierra", "tango", "victor", "whisky", "xray", "yankee")
SECOND = ("count", "limit", "flag", "mode", "size", "name", "path", "rate", "level", "offset", "index", "token")
HELD_OUT = ("argparse.py", "inspect.py", "textwrap.py", "typing.py", "tarfile.py")


def plant(text: str, rng, assignments: int) -> str:
  lines = text.split("\n")
  half = len(lines) // 2
  if half < 4:
    return text
  idents = sorted(set(re.findall(r"\b[a-z_][a-z0-9_]{2,}\b", text))) or ["value"]
  pairs = []
  for i in range(assignments):
    name = f"{FIRST[rng.integers(len(FIRST))]}_{SECOND[rng.integers(len(SECOND))]}_{rng.integers(100)}"
    value = str(rng.integers(1000)) if rng.random() < 0.5 else idents[rng.integers(len(idents))]
    pairs.append(f"{name} = {value}")
  first, second = lines[:half], lines[half:]
  s = rng.integers(0, max(1, half - 5))
  span = first[s:s + rng.integers(2, 6)]
  for line in pairs:
    first.insert(rng.integers(1, len(first) + 1), line)
  order = rng.permutation(len(pairs))
  for line in [pairs[i] for i in order] + ["\n".join(span)]:
    second.insert(rng.integers(1, len(second) + 1), line)
  return "\n".join(first + second)


def write_copy_corpus(directory: str, max_bytes: int = 3_000_000, seed: int = 0, piece: int = 3000,
                      assignments: int = 6) -> int:
  """Writes the corpus as .txt files under directory (temp name, then rename); returns the files written."""
  from jaxinfer.data.sources import list_files, select_files

  out = Path(directory)
  out.mkdir(parents=True, exist_ok=True)
  rng = np.random.default_rng(seed)
  files = [f for f in select_files(list_files((), (".py",)), max_bytes, seed) if f.name not in HELD_OUT]
  count = 0
  for f in files:
    try:
      text = f.read_text()
    except (UnicodeDecodeError, OSError):
      continue
    pieces = [text[i:i + piece] for i in range(0, len(text), piece)]
    body = "\n".join(plant(p, rng, assignments) for p in pieces)
    target = out / f"{count:05d}_{f.stem}.txt"
    tmp = target.with_suffix(".tmp")
    tmp.write_text(body)
    tmp.replace(target)
    count += 1
  return count


if __name__ == "__main__":
  print(write_copy_corpus(sys.argv[1]), "files written to", sys.argv[1])
