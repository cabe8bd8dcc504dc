"""Documents packed into fixed-length rows with segment ids and positions; seeded, resumable batch order.

A split is one token stream: its documents (each ending in EOS) concatenated in a seeded order. Row r holds
stream tokens [r*L, r*L + L] (L + 1 tokens: inputs are the first L, targets the last L), so no token is
wasted on padding. Within a row:

- segment_ids number the document fragments 1, 2, ... (0 is reserved for padding rows);
- positions restart at 0 at every fragment (a document cut by a row boundary continues as a new sequence);
- loss_mask is 1 where the target belongs to the same document as the input: the model never learns to
  predict across a document boundary, nor anything on padding.

Batch order: the rows of every epoch are permuted with a generator seeded by (seed, epoch); batch k takes
the rows k*B ... (k+1)*B - 1 of that endless sequence. The iterator's whole state is k (`position`), so a
resumed run continues exactly where the checkpoint was written. Each process reads only the rows of the batch
its devices hold.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np

from jaxinfer.data.corpus import Corpus

FIELDS = ("inputs", "targets", "positions", "segment_ids", "loss_mask")


@dataclasses.dataclass
class Split:
  tokens: np.ndarray  # [n] the split's stream
  doc_starts: np.ndarray  # [docs + 1] offsets into tokens
  seq_len: int

  @property
  def num_rows(self) -> int:
    return max(0, (len(self.tokens) - 1) // self.seq_len)

  @property
  def num_docs(self) -> int:
    return len(self.doc_starts) - 1

  def rows(self, row_ids: np.ndarray) -> dict[str, np.ndarray]:
    """The packed rows `row_ids` ([n] ints; -1 gives an all-padding row) as [n, seq_len] arrays."""
    row_ids = np.asarray(row_ids, dtype=np.int64)
    L = self.seq_len
    pad = row_ids < 0
    starts = np.where(pad, 0, row_ids) * L
    offsets = starts[:, None] + np.arange(L + 1)[None, :]
    toks = np.asarray(self.tokens[offsets.reshape(-1)], dtype=np.int32).reshape(offsets.shape)
    doc = np.searchsorted(self.doc_starts, offsets, side="right") - 1
    fragment_start = np.maximum(self.doc_starts[doc[:, :-1]], starts[:, None])
    out = {
        "inputs": toks[:, :-1],
        "targets": toks[:, 1:],
        "positions": (offsets[:, :-1] - fragment_start).astype(np.int32),
        "segment_ids": (doc[:, :-1] - doc[:, :1] + 1).astype(np.int32),
        "loss_mask": (doc[:, :-1] == doc[:, 1:]).astype(np.int32),
    }
    if pad.any():
      out["inputs"][pad] = 0
      out["targets"][pad] = 0
      out["positions"][pad] = np.arange(L, dtype=np.int32)
      out["segment_ids"][pad] = 0
      out["loss_mask"][pad] = 0
    return out


def split_documents(corpus: Corpus, eval_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
  """(train doc ids, eval doc ids): a seeded permutation of the documents, the last fraction held out."""
  n = corpus.num_docs
  order = np.random.default_rng([seed, 0x5EED]).permutation(n)
  n_eval = 0 if eval_fraction <= 0 else max(1, int(round(eval_fraction * n)))
  n_eval = min(n_eval, n - 1)
  return order[:n - n_eval], order[n - n_eval:]


def make_split(corpus: Corpus, doc_ids: Sequence[int], seq_len: int) -> Split:
  lengths = corpus.doc_starts[1:] - corpus.doc_starts[:-1]
  doc_ids = np.asarray(doc_ids, dtype=np.int64)
  if len(doc_ids) == 0:
    return Split(np.zeros((0,), corpus.tokens.dtype), np.zeros((1,), np.int64), seq_len)
  tokens = np.concatenate([corpus.doc(i) for i in doc_ids])
  starts = np.concatenate([[0], np.cumsum(lengths[doc_ids])]).astype(np.int64)
  return Split(tokens, starts, seq_len)


class BatchIterator:
  """Endless seeded batches of a Split as numpy dicts of [accum, local_rows, seq_len] arrays.

  global_batch rows per step, cut into `accum` micro-batches of global_batch // accum rows; this process
  materialises only the micro-batch rows listed in `local_rows` (default: all). `layout` (a pair of
  parallel.layouts functions, or None) permutes the sequence axis for sequence parallelism.
  """

  def __init__(self, split: Split, global_batch: int, accum: int = 1, seed: int = 0, position: int = 0,
               local_rows: Sequence[int] | None = None, layout=None, layout_shards: int = 1):
    if split.num_rows == 0:
      raise ValueError("the split holds fewer than seq_len + 1 tokens: no row to train on")
    if global_batch % accum:
      raise ValueError(f"global batch {global_batch} is not divisible by {accum} accumulation steps")
    self.split, self.global_batch, self.accum, self.seed = split, global_batch, accum, seed
    self.micro = global_batch // accum
    self.local_rows = np.arange(self.micro) if local_rows is None else np.asarray(local_rows, np.int64)
    self.layout, self.layout_shards = layout, layout_shards
    self.position = position
    self._perm_epoch, self._perm = -1, None

  def _row_of(self, flat: np.ndarray) -> np.ndarray:
    n = self.split.num_rows
    epochs = flat // n
    out = np.empty_like(flat)
    for epoch in np.unique(epochs):
      if epoch != self._perm_epoch:
        self._perm = np.random.default_rng([self.seed, int(epoch)]).permutation(n)
        self._perm_epoch = int(epoch)
      sel = epochs == epoch
      out[sel] = self._perm[flat[sel] % n]
    return out

  def batch_at(self, position: int) -> dict[str, np.ndarray]:
    base = position * self.global_batch
    flat = base + np.arange(self.accum)[:, None] * self.micro + self.local_rows[None, :]
    rows = self.split.rows(self._row_of(flat.reshape(-1)))
    out = {k: v.reshape(self.accum, len(self.local_rows), -1) for k, v in rows.items()}
    return apply_layout(out, self.layout, self.layout_shards)

  def __iter__(self):
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    batch = self.batch_at(self.position)
    self.position += 1
    return batch

  @property
  def epoch(self) -> float:
    return self.position * self.global_batch / self.split.num_rows


def eval_batches(split: Split, batch: int, max_batches: int, local_rows: Sequence[int] | None = None,
                 layout=None, layout_shards: int = 1) -> list[dict[str, np.ndarray]]:
  """The held-out rows in order, as up to max_batches [1, local_rows, seq_len] batches (last one padded)."""
  n = min(split.num_rows, batch * max_batches)
  count = -(-n // batch)
  local = np.arange(batch) if local_rows is None else np.asarray(local_rows, np.int64)
  out = []
  for b in range(count):
    ids = b * batch + local
    ids = np.where(ids < n, ids, -1)
    rows = split.rows(ids)
    out.append(apply_layout({k: v[None] for k, v in rows.items()}, layout, layout_shards))
  return out


def apply_layout(batch: dict[str, np.ndarray], layout, shards: int) -> dict[str, np.ndarray]:
  """Permutes every field along the sequence axis (the last one) with a parallel.layouts permutation."""
  if layout is None or shards <= 1:
    return batch
  return {k: np.ascontiguousarray(layout(v, shards, axis=v.ndim - 1)) for k, v in batch.items()}
