"""Data pipeline: sources, tokenizer + cached corpus, packing with segment-aware masks, seeded resumable order."""

import json

import numpy as np
import pytest

from jaxinfer.data import BatchIterator, Split, eval_batches, prepare_dataset, stdlib_root
from jaxinfer.data.corpus import unigram_entropy
from jaxinfer.config import data_section
from jaxinfer.data.sources import list_files
from jaxinfer.config import ConfigError
from parallel.layouts import LAYOUTS


def synthetic_split(seq_len=16, docs=12, seed=0):
  rng = np.random.default_rng(seed)
  lengths = rng.integers(3, 30, size=docs)
  starts = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
  tokens = rng.integers(1, 100, size=starts[-1]).astype(np.uint16)
  return Split(tokens, starts, seq_len)


def doc_of(split, offsets):
  return np.searchsorted(split.doc_starts, offsets, side="right") - 1


def test_rows_pack_documents_with_segments_positions_and_masks():
  split = synthetic_split()
  L = split.seq_len
  rows = split.rows(np.arange(split.num_rows))
  for r in range(split.num_rows):
    offsets = r * L + np.arange(L + 1)
    np.testing.assert_array_equal(rows["inputs"][r], split.tokens[offsets[:-1]])
    np.testing.assert_array_equal(rows["targets"][r], split.tokens[offsets[1:]])
    doc = doc_of(split, offsets)
    # the loss only ever asks to predict a token of the same document
    np.testing.assert_array_equal(rows["loss_mask"][r], (doc[:-1] == doc[1:]).astype(np.int32))
    seg = rows["segment_ids"][r]
    assert seg[0] == 1 and np.all(np.diff(seg) >= 0)
    np.testing.assert_array_equal(seg[1:] != seg[:-1], doc[1:-1] != doc[:-2])
    # positions restart at every fragment and count up inside it
    pos = rows["positions"][r]
    starts = np.concatenate([[True], seg[1:] != seg[:-1]])
    assert np.all(pos[starts] == 0)
    assert np.all(pos[~starts] == pos[np.flatnonzero(~starts) - 1] + 1)


def test_padding_rows_are_fully_masked():
  split = synthetic_split()
  rows = split.rows(np.array([-1, 0]))
  assert rows["loss_mask"][0].sum() == 0 and np.all(rows["segment_ids"][0] == 0)
  assert rows["loss_mask"][1].sum() > 0


def test_iterator_is_seeded_resumable_and_host_sharded():
  split = synthetic_split(docs=40)
  it = BatchIterator(split, global_batch=4, accum=2, seed=3)
  batches = [next(it) for _ in range(7)]
  assert batches[0]["inputs"].shape == (2, 2, split.seq_len)
  resumed = BatchIterator(split, 4, 2, seed=3, position=5)
  again = next(resumed)
  for field in batches[5]:
    np.testing.assert_array_equal(again[field], batches[5][field])
  # a process holding micro-batch row 1 only sees exactly that slice of the global batch
  local = BatchIterator(split, 4, 2, seed=3, local_rows=[1])
  np.testing.assert_array_equal(local.batch_at(2)["inputs"], batches[2]["inputs"][:, 1:2])
  # one epoch visits every row once; another seed, another order
  n = split.num_rows
  seen = BatchIterator(split, 1, 1, seed=3)
  firsts = [next(seen)["inputs"][0, 0, 0] for _ in range(n)]
  assert sorted(firsts) == sorted(split.rows(np.arange(n))["inputs"][:, 0].tolist())
  other = BatchIterator(split, 4, 2, seed=4)
  assert not np.array_equal(next(other)["inputs"], batches[0]["inputs"])


def test_eval_batches_cover_the_held_out_rows_once_with_padding():
  split = synthetic_split(docs=20)
  n = split.num_rows
  batches = eval_batches(split, batch=3, max_batches=100)
  assert len(batches) == -(-n // 3)
  total = sum(int(b["loss_mask"].sum()) for b in batches)
  assert total == int(split.rows(np.arange(n))["loss_mask"].sum())


@pytest.mark.parametrize("layout", ["striped", "zigzag"])
def test_sequence_layout_permutes_every_field_alike(layout):
  split = synthetic_split(seq_len=16, docs=30)
  plain = BatchIterator(split, 2, 1, seed=0).batch_at(0)
  permuted = BatchIterator(split, 2, 1, seed=0, layout=LAYOUTS[layout][0], layout_shards=2).batch_at(0)
  unpermute = LAYOUTS[layout][1]
  for field in plain:
    assert not np.array_equal(permuted[field], plain[field]) or field == "loss_mask"
    np.testing.assert_array_equal(unpermute(permuted[field], 2, axis=2), plain[field])


def test_prepare_dataset_files_globs_jsonl_cache_and_entropy(tmp_path):
  src = tmp_path / "src"
  src.mkdir()
  words = "alpha beta gamma delta epsilon zeta eta theta".split()
  rng = np.random.default_rng(0)
  for i in range(6):
    (src / f"f{i}.txt").write_text(" ".join(rng.choice(words, size=300)) + "\n")
  (src / "records.jsonl").write_text("\n".join(json.dumps({"text": " ".join(rng.choice(words, 200))})
                                               for _ in range(4)) + "\n")
  (src / "ignored.bin").write_bytes(b"\0\1")
  data = data_section(paths=(str(src),), cache_dir=str(tmp_path / "cache"), eval_fraction=0.2)
  ds = prepare_dataset(data, vocab_size=300, seq_len=32, workdir=tmp_path / "wd")
  assert ds.stats["num_docs"] == 10 and ds.stats["num_files"] == 7
  assert (tmp_path / "wd" / "tokenizer.json").is_file()
  assert ds.tokenizer.get_vocab_size() <= 300
  assert ds.train.num_docs + ds.eval.num_docs == 10 and ds.eval.num_docs == 2
  text = ds.tokenizer.decode(ds.corpus.doc(0)[:-1].tolist())
  assert text.split()[0] in words
  assert ds.corpus.doc(0)[-1] == ds.eos_id
  # unigram entropy: the entropy of the train split's token frequencies
  counts = np.bincount(np.asarray(ds.train.tokens, np.int64))
  p = counts[counts > 0] / counts.sum()
  assert ds.stats["unigram_entropy_nats"] == pytest.approx(-(p * np.log(p)).sum())
  assert unigram_entropy(np.array([0, 1, 0, 1]), 2)["bits"] == pytest.approx(1.0)
  # second time: tokenizer and tokens come from the cache (memory-mapped), not rebuilt
  cached = sorted((tmp_path / "cache").rglob("tokens.npy"))
  mtime = cached[0].stat().st_mtime_ns
  again = prepare_dataset(data, vocab_size=300, seq_len=32, workdir=tmp_path / "wd")
  assert isinstance(again.corpus.tokens, np.memmap)
  assert cached[0].stat().st_mtime_ns == mtime and sorted((tmp_path / "cache").rglob("tokens.npy")) == cached
  # a glob selects files too
  globbed = prepare_dataset(data_section(paths=(str(src / "f*.txt"),), cache_dir=str(tmp_path / "cache"),
                                         eval_fraction=0.0), 300, 32, tmp_path / "wd2")
  assert globbed.stats["num_files"] == 6


def test_empty_or_missing_corpus_is_a_config_error(tmp_path):
  empty = tmp_path / "empty"
  empty.mkdir()
  (empty / "a.txt").write_text("")
  (empty / "b.txt").write_text("   \n")
  with pytest.raises(ConfigError, match="data.paths"):
    prepare_dataset(data_section(paths=(str(empty),), cache_dir=str(tmp_path / "c")), 300, 16, tmp_path / "wd")
  assert not (tmp_path / "wd").exists()
  with pytest.raises(ConfigError, match=r"data.paths\[0\].*matches no readable file"):
    list_files((str(tmp_path / "nothing*.txt"),), (".txt",))


def test_default_corpus_is_the_standard_library():
  assert (stdlib_root() / "os.py").is_file()
  files = list_files((), ())
  assert any(f.name == "os.py" for f in files)
  assert not any("site-packages" in f.parts for f in files)
