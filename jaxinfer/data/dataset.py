"""The `data` config section and `prepare_dataset`: files -> tokenizer -> cached tokens -> train / eval splits."""

from __future__ import annotations

import dataclasses
import logging
import shutil
from pathlib import Path
from typing import Callable

from jaxinfer.data.corpus import (Corpus, build_corpus, build_tokenizer, default_cache_dir, eos_id, load_corpus,
                                  load_tokenizer_file, unigram_entropy)
from jaxinfer.data.packing import Split, make_split, split_documents
from jaxinfer.data.sources import list_files, read_documents, select_files
from jaxinfer.config import ConfigError, from_section, path_field, require

log = logging.getLogger("jaxinfer.data")


@dataclasses.dataclass(frozen=True)
class DataConfig:
  """The `data` section: which files, how they are sampled and split, and which tokenizer."""
  SECTION = "data"
  paths: tuple[str, ...] = path_field(())  # files, globs or directories; empty: the Python standard library's tree
  extensions: tuple[str, ...] = (".py", ".txt", ".md", ".rst", ".jsonl")  # read from directories
  jsonl_field: str = "text"  # the text field of each .jsonl record
  max_bytes: int = 0  # > 0: a seeded sample of whole files totalling at most this many bytes
  tokenizer: str = path_field("")  # a tokenizer.json (or a directory holding one); empty: train a BPE of vocab_size
  eval_fraction: float = 0.05  # fraction of documents held out for eval loss / perplexity
  seed: int = 0  # file sample, document split and row order
  cache_dir: str = path_field("")  # empty: $JAXINFER_CACHE_DIR, else ~/.cache/jaxinfer

  def __post_init__(self):
    require(isinstance(self.max_bytes, int) and self.max_bytes >= 0, "data.max_bytes",
            f"must be an integer >= 0, got {self.max_bytes!r}")
    require(0 <= self.eval_fraction < 1, "data.eval_fraction", f"must lie in [0, 1), got {self.eval_fraction}")


@dataclasses.dataclass
class Dataset:
  tokenizer: object  # tokenizers.Tokenizer
  tokenizer_file: Path
  corpus: Corpus
  train: Split
  eval: Split
  stats: dict

  @property
  def eos_id(self) -> int | None:
    return eos_id(self.tokenizer)


def prepare_dataset(data, vocab_size: int, seq_len: int, workdir: Path, *, is_leader: bool = True,
                    barrier: Callable[[str], None] = lambda name: None) -> Dataset:
  """Resolves files, gets the tokenizer (workdir copy > data.tokenizer > cached/trained BPE), tokenizes once.

  The leader (process 0) trains the tokenizer, writes it to workdir/tokenizer.json and fills the cache; the
  other processes wait at `barrier`, then read the workdir copy (so every host uses the same tokenizer even
  with a per-host cache directory) and tokenize only if their cache lacks the corpus.
  """
  data = from_section(DataConfig, data, "data")
  cache_dir = Path(data.cache_dir).expanduser() if data.cache_dir else default_cache_dir()
  files = list_files(tuple(data.paths), tuple(data.extensions))
  files = select_files(files, int(data.max_bytes), int(data.seed))
  where = "the standard library" if not data.paths else repr(tuple(data.paths))
  if not files:
    raise ConfigError(f"data.paths: no non-empty file found in {where}"
                      + (f" within data.max_bytes={data.max_bytes}" if data.max_bytes else ""))
  workdir_tokenizer = Path(workdir) / "tokenizer.json"

  def build():
    docs, skipped = read_documents(files, data.jsonl_field)
    if not docs:
      raise ConfigError(f"data.paths: the corpus is empty: {len(files)} file(s) in {where} hold no decodable "
                        f"text (skipped: {skipped})")
    if workdir_tokenizer.is_file():
      tokenizer_file = workdir_tokenizer  # a resumed run keeps the tokenizer it started with
    elif data.tokenizer:
      load_tokenizer_file(data.tokenizer)  # validates
      src = Path(data.tokenizer)
      tokenizer_file = src / "tokenizer.json" if src.is_dir() else src
    else:
      tokenizer_file = build_tokenizer(files, docs, vocab_size, cache_dir, data.jsonl_field)
    if not workdir_tokenizer.is_file():
      Path(workdir).mkdir(parents=True, exist_ok=True)
      tmp = workdir_tokenizer.with_suffix(".json.tmp")
      shutil.copyfile(tokenizer_file, tmp)
      tmp.replace(workdir_tokenizer)
    return build_corpus(files, workdir_tokenizer, cache_dir, data.jsonl_field, docs=docs)

  if is_leader:
    corpus_dir = build()
    barrier("jaxinfer_data_ready")
  else:
    barrier("jaxinfer_data_ready")
    corpus_dir = build()
  tokenizer = load_tokenizer_file(workdir_tokenizer)
  if tokenizer.get_vocab_size() > vocab_size:
    raise ConfigError(f"model.vocab_size: the tokenizer ({workdir_tokenizer}) has {tokenizer.get_vocab_size()} "
                      f"tokens, more than model.vocab_size={vocab_size}")
  corpus = load_corpus(corpus_dir)
  if corpus.num_docs == 0 or len(corpus.tokens) == 0:
    raise ConfigError(f"data.paths: the corpus is empty: {len(files)} file(s) in {where} hold no decodable "
                      f"text (skipped: {corpus.meta.get('skipped')})")
  if data.eval_fraction > 0 and corpus.num_docs < 2:
    raise ConfigError(f"data.eval_fraction: the corpus has a single document, nothing to hold out; set "
                      f"data.eval_fraction=0 or add documents")
  train_ids, eval_ids = split_documents(corpus, float(data.eval_fraction), int(data.seed))
  train, held_out = make_split(corpus, train_ids, seq_len), make_split(corpus, eval_ids, seq_len)
  if train.num_rows == 0:
    raise ConfigError(f"train.seq_len: the training split has {len(train.tokens)} tokens, fewer than one row "
                      f"of seq_len + 1 = {seq_len + 1}; use more data (data.max_bytes / data.paths)")
  if data.eval_fraction > 0 and held_out.num_rows == 0:
    raise ConfigError(f"data.eval_fraction: the held-out split has {len(held_out.tokens)} tokens, fewer than one "
                      f"row of seq_len + 1 = {seq_len + 1}; raise data.eval_fraction or use more data")
  entropy = unigram_entropy(train.tokens, vocab_size)
  stats = dict(corpus.meta, train_docs=train.num_docs, eval_docs=held_out.num_docs,
               train_tokens=int(len(train.tokens)), eval_tokens=int(len(held_out.tokens)),
               train_rows=train.num_rows, eval_rows=held_out.num_rows, unigram_entropy_nats=entropy["nats"],
               unigram_entropy_bits=entropy["bits"], source=where, corpus_cache=str(corpus_dir))
  log.info("data: %d files, %d docs, %d train tokens (%d rows of %d), %d held-out tokens; unigram entropy "
           "%.3f nats (%.3f bits) per token", len(files), corpus.num_docs, stats["train_tokens"], train.num_rows,
           seq_len, stats["eval_tokens"], entropy["nats"], entropy["bits"])
  return Dataset(tokenizer, workdir_tokenizer, corpus, train, held_out, stats)
