"""Tokenizer and tokenized corpus, both cached on disk.

- Tokenizer: an existing tokenizer.json (`data.tokenizer`), or a byte-level BPE of `model.vocab_size` trained
  with the `tokenizers` library on the corpus itself (cached under a key of the file list and vocab size).
  Every document ends with the end-of-text token `<|endoftext|>`.
- Tokenized corpus: all documents encoded once into `tokens.npy` (uint16 when the vocabulary fits, else
  uint32) with `doc_starts.npy` (offsets, n_docs + 1 entries), read back memory-mapped. The cache directory is
  built under a temporary name and renamed into place, so a killed run never leaves a half-written cache.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Sequence

import numpy as np

from jaxinfer.data.sources import fingerprint_files, read_documents
from jaxinfer.config import ConfigError

log = logging.getLogger("jaxinfer.data")

EOS_TOKEN = "<|endoftext|>"
FORMAT_VERSION = 1


def default_cache_dir() -> Path:
  if os.environ.get("JAXINFER_CACHE_DIR"):
    return Path(os.environ["JAXINFER_CACHE_DIR"])
  base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
  return Path(base) / "jaxinfer"


def _key(*parts) -> str:
  return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:20]


def _publish_dir(build, target: Path) -> Path:
  """Runs build(tmp_dir) and renames tmp_dir to target (atomic; a concurrent winner is kept)."""
  if target.is_dir():
    return target
  target.parent.mkdir(parents=True, exist_ok=True)
  tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
  try:
    build(tmp)
    try:
      os.rename(tmp, target)
    except OSError:
      if not target.is_dir():
        raise
  finally:
    if tmp.exists():
      shutil.rmtree(tmp, ignore_errors=True)
  return target


# ---------------------------------------------------------------------------------------------- tokenizer
def train_bpe(docs: Sequence[str], vocab_size: int):
  """A byte-level BPE tokenizers.Tokenizer with `vocab_size` entries (including <|endoftext|>)."""
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

  if vocab_size < 257:
    raise ConfigError(f"model.vocab_size: a byte-level BPE needs at least 257 entries (256 bytes + "
                      f"{EOS_TOKEN}), got {vocab_size}")
  tokenizer = Tokenizer(models.BPE())
  tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tokenizer.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS_TOKEN], show_progress=False,
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
  tokenizer.train_from_iterator(docs, trainer=trainer, length=len(docs))
  return tokenizer


def load_tokenizer_file(path: str | os.PathLike):
  from tokenizers import Tokenizer

  path = Path(path)
  file = path / "tokenizer.json" if path.is_dir() else path
  if not file.is_file():
    raise ConfigError(f"data.tokenizer: {file} does not exist")
  try:
    return Tokenizer.from_file(str(file))
  except Exception as e:  # tokenizers raises plain Exceptions from Rust
    raise ConfigError(f"data.tokenizer: {file} is not a valid tokenizer.json ({e})") from None


def tokenizer_cache_path(cache_dir: Path, files: Sequence[Path], vocab_size: int) -> Path:
  key = _key("bpe", FORMAT_VERSION, vocab_size, fingerprint_files(files))
  return cache_dir / "tokenizers" / key / "tokenizer.json"


def build_tokenizer(files: Sequence[Path], docs: Sequence[str] | None, vocab_size: int, cache_dir: Path,
                    jsonl_field: str = "text") -> Path:
  """Trains (or finds in the cache) the corpus BPE; returns the path of its tokenizer.json."""
  target = tokenizer_cache_path(cache_dir, files, vocab_size)

  def build(tmp: Path):
    texts = docs if docs is not None else read_documents(files, jsonl_field)[0]
    log.info("training a byte-level BPE tokenizer (vocab %d) on %d documents", vocab_size, len(texts))
    train_bpe(texts, vocab_size).save(str(tmp / "tokenizer.json"))

  _publish_dir(build, target.parent)
  return target


def eos_id(tokenizer) -> int | None:
  return tokenizer.token_to_id(EOS_TOKEN)


# ---------------------------------------------------------------------------------------------- corpus
@dataclasses.dataclass
class Corpus:
  tokens: np.ndarray  # [n_tokens] memory-mapped, every document followed by EOS (when the tokenizer has one)
  doc_starts: np.ndarray  # [n_docs + 1] int64 offsets into tokens
  meta: dict

  @property
  def num_docs(self) -> int:
    return len(self.doc_starts) - 1

  def doc(self, i: int) -> np.ndarray:
    return self.tokens[self.doc_starts[i]:self.doc_starts[i + 1]]


def corpus_cache_path(cache_dir: Path, files: Sequence[Path], tokenizer_file: Path, jsonl_field: str) -> Path:
  tok_hash = hashlib.sha256(Path(tokenizer_file).read_bytes()).hexdigest()[:16]
  key = _key("corpus", FORMAT_VERSION, tok_hash, jsonl_field, fingerprint_files(files))
  return cache_dir / "corpora" / key


def build_corpus(files: Sequence[Path], tokenizer_file: Path, cache_dir: Path, jsonl_field: str = "text",
                 docs: Sequence[str] | None = None) -> Path:
  """Tokenizes every document once into the cache (if not there yet); returns the cache directory."""
  target = corpus_cache_path(cache_dir, files, tokenizer_file, jsonl_field)

  def build(tmp: Path):
    texts, skipped = (docs, {}) if docs is not None else read_documents(files, jsonl_field)
    tokenizer = load_tokenizer_file(tokenizer_file)
    vocab = tokenizer.get_vocab_size()
    dtype = np.uint16 if vocab <= np.iinfo(np.uint16).max + 1 else np.uint32
    end = eos_id(tokenizer)
    log.info("tokenizing %d documents", len(texts))
    lengths, chunks = [], []
    for start in range(0, len(texts), 256):
      for enc in tokenizer.encode_batch(list(texts[start:start + 256]), add_special_tokens=False):
        ids = np.asarray(enc.ids, dtype=dtype)
        if end is not None:
          ids = np.append(ids, np.asarray(end, dtype))
        chunks.append(ids)
        lengths.append(len(ids))
    tokens = np.concatenate(chunks) if chunks else np.zeros((0,), dtype)
    doc_starts = np.concatenate([[0], np.cumsum(lengths, dtype=np.int64)]).astype(np.int64)
    np.save(tmp / "tokens.npy", tokens)
    np.save(tmp / "doc_starts.npy", doc_starts)
    meta = {"num_docs": len(texts), "num_tokens": int(len(tokens)), "num_files": len(files),
            "num_bytes": int(sum(len(t.encode("utf-8")) for t in texts)), "vocab_size": vocab,
            "eos_id": end, "skipped": skipped, "format": FORMAT_VERSION}
    (tmp / "meta.json").write_text(json.dumps(meta, indent=2))

  _publish_dir(build, target)
  return target


def load_corpus(path: Path) -> Corpus:
  return Corpus(tokens=np.load(path / "tokens.npy", mmap_mode="r"),
                doc_starts=np.load(path / "doc_starts.npy"),
                meta=json.loads((path / "meta.json").read_text()))


def unigram_entropy(tokens: np.ndarray, vocab_size: int) -> dict[str, float]:
  """Entropy of the token unigram distribution: the loss of the best model that ignores all context."""
  counts = np.bincount(np.asarray(tokens, dtype=np.int64), minlength=vocab_size).astype(np.float64)
  p = counts[counts > 0] / counts.sum()
  nats = float(-(p * np.log(p)).sum())
  return {"nats": nats, "bits": nats / np.log(2.0)}
