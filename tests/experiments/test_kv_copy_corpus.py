"""The copy-dense corpus: every kind of document really holds its copies, and held-out files stay out."""

import re

import numpy as np

from jaxinfer.experiments import kv_copy_corpus as C

TEXT = "\n".join(f"def func_{i}(value):\n    return value * {i} + offset  # compute the thing" for i in range(200))


def test_each_kind_repeats_what_it_plants():
  rng = np.random.default_rng(0)
  idents = sorted(set(re.findall(r"\b[a-z][a-z]{2,7}\b", TEXT)))
  for _ in range(20):
    doc = C.span_doc(TEXT, rng, 1500)
    first = doc.split("\n")[0]
    assert doc.count(first) >= 2
    doc = C.words_doc(TEXT, idents, rng, 1500)
    words = doc.split("\n")[0]
    assert len(words.split()) >= 8 and doc.count(words) >= 2
    doc = C.assign_doc(TEXT, idents, rng, 1500, assignments=5)
    planted = [line for line in doc.split("\n") if re.fullmatch(r"[a-z]+_[a-z]+_\d+ = \S+", line)]
    assert len(planted) >= 10 and all(doc.count(line + "\n") + doc.endswith(line) >= 2 for line in planted)


def test_corpus_leaves_out_the_evaluated_files(tmp_path):
  n = C.write_copy_corpus(str(tmp_path), max_bytes=400_000, docs_per_file=2, sizes=(300, 600))
  names = [p.name for p in tmp_path.iterdir()]
  assert n == len(names) > 0 and all(p.endswith(".txt") for p in names)
  assert not any(p.split("_", 1)[1] in {h.removesuffix(".py") + ".txt" for h in C.HELD_OUT} for p in names)
