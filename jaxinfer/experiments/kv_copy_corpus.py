"""A copy-dense training corpus for the kv_compression experiment's model: documents built from the quickstart's
stdlib sample in which a large share of the tokens can only be predicted by copying from earlier in the same
document, so that a small model forms induction heads (what the retrieval probe needs) within a CPU-sized run.
Plain stdlib text does not teach that in minutes: a repeated span is predicted no better the second time.

  python -m jaxinfer.experiments.kv_copy_corpus /tmp/kv_corpus      # then train with --config.data.paths=...

Each document (about 1,000 to 4,000 characters, so most fit one 1K-token row) is one of three kinds, drawn
with probabilities `mix`:
  - span: a stretch of a stdlib file, other text of the file, then the stretch again (copy distances from 0 to
    about 700 tokens);
  - words: a list of identifiers drawn at random from the file (nothing predicts them but the list's first
    copy), other text, then the list again;
  - assign: a stdlib piece with `assignments` lines `<name> = <value>` planted in its first third and the same
    lines again, shuffled, at its end: the probe's own format, with names from word lists the probe never uses
    (kv_compression.PROBE_WORDS) and values a space and a lowercase identifier or a number, as the probe's are.
The files the experiment evaluates on (HELD_OUT: its files and calibration file) are left out.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

FIRST = ("alpha", "bravo", "delta", "echo", "foxtrot", "golf", "hotel", "india", "kilo", "lima", "mike", "oscar",
         "papa", "romeo", "sierra", "tango", "victor", "whisky", "xray", "yankee")
SECOND = ("count", "limit", "flag", "mode", "size", "name", "path", "rate", "level", "offset", "index", "token")
HELD_OUT = ("argparse.py", "inspect.py", "textwrap.py", "typing.py", "tarfile.py")
KINDS = ("span", "words", "assign", "text")


def _piece(text: str, rng, size: int) -> str:
  start = int(rng.integers(0, max(1, len(text) - size)))
  return text[start:start + size]


def span_doc(text: str, rng, size: int) -> str:
  body = _piece(text, rng, size)
  span_len = int(rng.integers(size // 8, size // 3))
  gap = body[span_len:size - span_len]
  return body[:span_len] + gap[:int(rng.integers(0, len(gap) + 1))] + "\n" + body[:span_len]


def words_doc(text: str, idents: list[str], rng, size: int) -> str:
  n = int(rng.integers(8, max(9, size // 40)))
  words = " ".join(idents[i] for i in rng.integers(0, len(idents), size=n))
  parts = [words]
  for _ in range(int(rng.integers(1, 4))):  # 2 to 4 copies, each after a stretch of text (often none)
    gap = _piece(text, rng, int(rng.integers(0, max(1, size - 3 * len(words))))) if rng.random() < 0.5 else ""
    parts += [gap, words]
  return "\n".join(p for p in parts if p)


def assign_doc(text: str, idents: list[str], rng, size: int, assignments: int) -> str:
  lines = _piece(text, rng, size).split("\n")
  if len(lines) < 6:
    return span_doc(text, rng, size)
  pairs = []
  for _ in range(assignments):
    name = f"{FIRST[rng.integers(len(FIRST))]}_{SECOND[rng.integers(len(SECOND))]}_{rng.integers(100)}"
    value = str(rng.integers(1000)) if rng.random() < 0.5 else idents[rng.integers(len(idents))]
    pairs.append(f"{name} = {value}")
  head = lines[:len(lines) // 3]
  for line in pairs:
    head.insert(int(rng.integers(1, len(head) + 1)), line)
  tail = [pairs[i] for i in rng.permutation(len(pairs))]
  return "\n".join(head + lines[len(lines) // 3:] + tail)


def make_doc(text: str, rng, mix=(0.4, 0.3, 0.3, 0.0), assignments: int = 12, sizes=(1000, 4000)) -> str:
  idents = sorted(set(re.findall(r"\b[a-z][a-z]{2,7}\b", text))) or ["value"]
  size = int(rng.integers(*sizes))
  kind = KINDS[rng.choice(len(KINDS), p=np.asarray(mix) / np.sum(mix))]
  if kind == "span":
    return span_doc(text, rng, size)
  if kind == "words":
    return words_doc(text, idents, rng, size)
  if kind == "assign":
    return assign_doc(text, idents, rng, size, assignments)
  return _piece(text, rng, size)


def write_copy_corpus(directory: str, max_bytes: int = 3_000_000, seed: int = 0, docs_per_file: int = 12,
                      mix=(0.4, 0.3, 0.3, 0.0), assignments: int = 12, sizes=(1000, 4000)) -> int:
  """Writes the corpus as .txt files under directory (one per stdlib file, documents separated by the
  tokenizer's end of text through separate files: each file is one document); temp name, then rename.
  Returns the number of documents written."""
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
    if len(text) < 2000:
      continue
    for _ in range(max(1, min(docs_per_file * len(text) // 20000, 40))):
      target = out / f"{count:06d}_{f.stem}.txt"
      tmp = target.with_suffix(".tmp")
      tmp.write_text(make_doc(text, rng, mix, assignments, sizes))
      tmp.replace(target)
      count += 1
  return count


def main(argv=None) -> None:
  import argparse
  p = argparse.ArgumentParser(description="writes the copy-dense corpus (see the module docstring)")
  p.add_argument("directory")
  p.add_argument("--mix", type=float, nargs=4, default=(0.4, 0.3, 0.3, 0.0), metavar=KINDS)
  p.add_argument("--sizes", type=int, nargs=2, default=(1000, 4000), help="document length range, characters")
  p.add_argument("--docs-per-file", type=int, default=12)
  p.add_argument("--seed", type=int, default=0)
  a = p.parse_args(argv)
  n = write_copy_corpus(a.directory, seed=a.seed, docs_per_file=a.docs_per_file, mix=tuple(a.mix),
                        sizes=tuple(a.sizes))
  print(n, "documents written to", a.directory)


if __name__ == "__main__":
  main()
