"""The typed inputs of one engine step, and the BatchBuilder that makes them from a Schedule.

  StepBatch
    tokens [T]            input token of each row (host-known ones)
    prev_index [T]        -1, or the row of the previous step's sampled vector holding this row's token (async
                          scheduling: that token is still on the device when this step is built)
    attn: AttentionMetadata   where to write and what to attend (positions, slot mapping, ragged layout,
                              which page-table row each sequence reads, optional prefix groups)
    sampling: SamplingMetadata  which rows are sampled and how (one row per sampling sequence, several for a
                                sequence verifying draft tokens)

Padding rules, written once (`StepBatch.empty`): padding token rows carry token 0 at position 0, an out-of-pool
slot (their k/v are dropped) and belong to no sequence (cu_q_lens stops at the real tokens); padding
sequences have kv_len 0 and page-table row 0; padding sample rows read row 0 with greedy parameters and their
results are ignored; padding prefix-group members point at row T (dropped).

Shapes come from buckets (powers of two) so a serving loop compiles a bounded number of programs: the token
count T (a decode-only step is padded to its sequence bucket only, unless `min_token_bucket` says
otherwise), the sequence count S, the sample rows R (= S unless sequences verify drafts) and the prefix
groups G.

The page table lives on the device (ModelRunner.table, one row per request slot); the builder keeps a host
mirror and emits only the entries that changed (`TableUpdate`), so no step rebuilds it from Python lists.
"""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
from flax import struct

from jaxinfer.engine.kv_policy import KVPolicy, PagedLayout
from jaxinfer.engine.tree_attention import ancestor_mask
from jaxinfer.engine.tree_attention import depths as tree_depths
from jaxinfer.engine.scheduler import Schedule, ScheduledSeq

DEFAULT_MIN_TOKEN_BUCKET = 16  # steps with prefill, when EngineConfig.min_token_bucket is None


def buckets(minimum: int, maximum: int) -> tuple[int, ...]:
  """Powers of two from `minimum` below `maximum`, then `maximum` itself."""
  sizes, b = [], minimum
  while b < maximum:
    sizes.append(b)
    b *= 2
  return tuple(sizes) + (maximum,)


def pick_bucket(n: int, sizes: tuple[int, ...]) -> int:
  for size in sizes:
    if n <= size:
      return size
  raise ValueError(f"{n} exceeds the largest bucket {sizes[-1]}")


@struct.dataclass
class AttentionMetadata:
  positions: jax.Array  # [T] int32
  slot_mapping: jax.Array  # [T] int32: flat pool slot each new token's k/v goes to (out of pool: dropped)
  cu_q_lens: jax.Array  # [S + 1] int32
  kv_lens: jax.Array  # [S] int32: tokens cached per sequence, this step's included
  seq_slots: jax.Array  # [S] int32: the page-table row (request slot) of each sequence
  num_seqs: jax.Array  # scalar int32
  group_rows: jax.Array | None = None  # [G, S] int32: decode row of each prefix-group member (pad: T)
  group_table: jax.Array | None = None  # [G, pages_per_seq] int32
  group_lens: jax.Array | None = None  # [G] int32
  seq_prefix_lens: jax.Array | None = None  # [S] int32
  policy_weights: jax.Array | None = None  # [T] float32: weight of each row in a KV policy's scores
  policy_reset: jax.Array | None = None  # [S] bool: the sequence's policy score row starts from zero
  # candidate trees (Medusa verification; None unless the engine verifies trees): M member rows, the rows of
  # every sequence whose drafts form a tree (its own last token, the root, then the nodes); their attention is
  # the cached context plus their ancestors in the step (jaxinfer/engine/tree_attention.py)
  tree_rows: jax.Array | None = None  # [M] int32: the step row of each member (pad: T, dropped)
  tree_seqs: jax.Array | None = None  # [M] int32: the member's sequence (its page-table row)
  tree_ctx: jax.Array | None = None  # [M] int32: cached tokens the member sees through the pages (pad: 0)
  tree_mask: jax.Array | None = None  # [M, M] bool: member j is member i or one of its ancestors
  num_tree_rows: jax.Array | None = None  # scalar int32: members in use (the first ones)


@struct.dataclass
class SamplingMetadata:
  rows: jax.Array  # [R] int32: the token row whose hidden state gives this sample
  positions: jax.Array  # [R] int32: position of the token being sampled (its random stream is fold_in(seed, it))
  temperature: jax.Array  # [R] float32
  top_k: jax.Array  # [R] int32
  top_p: jax.Array  # [R] float32
  min_p: jax.Array  # [R] float32
  seeds: jax.Array  # [R] uint32


@struct.dataclass
class StepBatch:
  tokens: jax.Array  # [T] int32
  prev_index: jax.Array  # [T] int32
  attn: AttentionMetadata
  sampling: SamplingMetadata

  @property
  def shape(self) -> tuple[int, int, int, int]:
    """(T, S, R, G) of this batch."""
    g = 0 if self.attn.group_lens is None else self.attn.group_lens.shape[0]
    return self.tokens.shape[0], self.attn.kv_lens.shape[0], self.sampling.rows.shape[0], g

  @staticmethod
  def empty(t_pad: int, s_pad: int, r_pad: int, g_pad: int, pages_per_seq: int, num_slots: int,
            tree_pad: int = 0) -> "StepBatch":
    """A batch of padding only (every padding rule of the step lives here), as NumPy arrays."""
    groups = {} if not g_pad else dict(
        group_rows=np.full((g_pad, s_pad), t_pad, np.int32), group_table=np.zeros((g_pad, pages_per_seq), np.int32),
        group_lens=np.zeros((g_pad,), np.int32), seq_prefix_lens=np.zeros((s_pad,), np.int32))
    if tree_pad:  # padding members: row T (dropped), no context, themselves only
      groups.update(tree_rows=np.full((tree_pad,), t_pad, np.int32), tree_seqs=np.zeros((tree_pad,), np.int32),
                    tree_ctx=np.zeros((tree_pad,), np.int32), tree_mask=np.eye(tree_pad, dtype=bool),
                    num_tree_rows=np.int32(0))
    attn = AttentionMetadata(positions=np.zeros((t_pad,), np.int32),
                             slot_mapping=np.full((t_pad,), num_slots, np.int32),
                             cu_q_lens=np.zeros((s_pad + 1,), np.int32), kv_lens=np.zeros((s_pad,), np.int32),
                             seq_slots=np.zeros((s_pad,), np.int32), num_seqs=np.int32(0), **groups)
    sampling = SamplingMetadata(rows=np.zeros((r_pad,), np.int32), positions=np.zeros((r_pad,), np.int32),
                                temperature=np.zeros((r_pad,), np.float32), top_k=np.zeros((r_pad,), np.int32),
                                top_p=np.ones((r_pad,), np.float32), min_p=np.zeros((r_pad,), np.float32),
                                seeds=np.zeros((r_pad,), np.uint32))
    return StepBatch(tokens=np.zeros((t_pad,), np.int32), prev_index=np.full((t_pad,), -1, np.int32), attn=attn,
                     sampling=sampling)


@dataclasses.dataclass
class TableUpdate:
  """Entries of the device page table to set before the step: table[slots[i], cols[i]] = pages[i]."""
  slots: np.ndarray
  cols: np.ndarray
  pages: np.ndarray


@dataclasses.dataclass
class BuiltStep:
  batch: StepBatch
  seqs: list[ScheduledSeq]
  sample_rows: list[tuple[int, int]]  # per sequence: (first sample row, rows); (0, 0) when it samples nothing
  table_update: TableUpdate | None
  num_tokens: int
  shape: tuple[int, int, int, int]
  decode_only: bool = False  # one token per sequence at row s, no prefix groups: the decode-kernel program
  table_pages: int | None = None  # page-table columns the step program reads (None: all of ModelRunner.table)


class BatchBuilder:
  """Turns a Schedule into a StepBatch (NumPy, padded) and keeps the host mirror of the device page table.

  Request slots: each request holding pages owns one row of the page table while it runs (given on first
  use, returned by `release`). At most max_batch_size requests run at once, so max_batch_size rows."""

  def __init__(self, *, max_batch_size: int, max_step_tokens: int, page_size: int, pages_per_seq: int,
               num_pages: int, min_token_bucket: int | None, min_seq_bucket: int, max_rows_per_seq: int,
               max_prefix_groups: int, shared_prefix_attention: bool, policy: KVPolicy | None = None,
               tree_verification: bool = False, narrow_pages: int | None = None):
    self.page_size, self.pages_per_seq, self.num_pages = page_size, pages_per_seq, num_pages
    if narrow_pages is not None and not 1 <= narrow_pages < pages_per_seq:
      raise ValueError(f"narrow_pages={narrow_pages} must be in [1, pages_per_seq={pages_per_seq})")
    self.narrow_pages = narrow_pages  # a second page-table width (KV policy decode_table_pages), or None
    self.num_slots = num_pages * page_size
    self.max_batch_size = max_batch_size
    self.decode_buckets = min_token_bucket is None  # decode-only steps padded to their sequence bucket
    first = DEFAULT_MIN_TOKEN_BUCKET if min_token_bucket is None else min_token_bucket
    self.token_buckets = buckets(min(first, max_step_tokens), max_step_tokens)
    self.seq_buckets = buckets(min(min_seq_bucket, max_batch_size), max_batch_size)
    self.max_rows = max_batch_size * max_rows_per_seq
    # tree verification: every step carries M = max_rows tree members (one program structure, no new shapes)
    self.tree_pad = self.max_rows if tree_verification else 0
    # sample-row counts beyond the sequence bucket exist only when sequences may verify drafts
    self.row_buckets = (buckets(min(min_seq_bucket, self.max_rows), self.max_rows) if max_rows_per_seq > 1
                        else ())
    self.group_buckets = (0,) + (buckets(1, max_prefix_groups) if shared_prefix_attention else ())
    self.policy = policy or PagedLayout(page_size, self.num_slots)
    self._slot_of: dict[int, int] = {}
    self._free_slots = list(range(max_batch_size - 1, -1, -1))
    self._synced: list[list[int]] = [[] for _ in range(max_batch_size)]  # device table row contents

  # ------------------------------------------------------------------ shapes
  @property
  def max_programs(self) -> int:
    """Upper bound on the step programs: (T, S, R, G) shapes, plus one decode-only program per sequence
    bucket when decode-only steps are padded to their sequence bucket."""
    r = 1 + len(self.row_buckets)
    mixed = len(self.token_buckets) * len(self.seq_buckets) * r * len(self.group_buckets)
    return (mixed + (len(self.seq_buckets) if self.decode_buckets else 0)) * len(self.table_widths)

  @property
  def table_widths(self) -> tuple[int, ...]:
    """Page-table widths a step program may be compiled for: the full one, and the narrow one if any."""
    return (self.pages_per_seq,) + ((self.narrow_pages,) if self.narrow_pages else ())

  def table_width(self, seqs) -> int:
    """The step's page-table width: the narrow one when every sequence's pages fit in it, else the full one.
    Pages past the width are never read (kv_len <= pages held x page_size), so the narrow program attends
    exactly what the full one would."""
    if self.narrow_pages and all(len(s.request.pages) <= self.narrow_pages for s in seqs):
      return self.narrow_pages
    return self.pages_per_seq

  def all_shapes(self):
    """Every ((T, S, R, G), decode_only) program a step can take (for warmup)."""
    for s in self.seq_buckets:
      for t in self.token_buckets:
        for r in (s,) + tuple(b for b in self.row_buckets if b > s):
          for g in self.group_buckets:
            yield (t, s, r, g), False
      if self.decode_buckets:
        yield (s, s, s, 0), True

  def step_shape(self, schedule: Schedule) -> tuple[int, int, int, int]:
    seqs = schedule.seqs
    s_pad = pick_bucket(len(seqs), self.seq_buckets)
    n_tokens = schedule.num_tokens
    if self.decode_buckets and n_tokens == len(seqs) and not schedule.groups:
      t_pad = s_pad  # decode only: no prefill-sized padding (its own program, the decode kernel)
    else:
      t_pad = pick_bucket(n_tokens, self.token_buckets)
    rows = sum(s.num_samples for s in seqs)
    r_pad = s_pad if rows <= s_pad else pick_bucket(rows, self.row_buckets)
    g_pad = pick_bucket(len(schedule.groups), self.group_buckets) if schedule.groups else 0
    return t_pad, s_pad, r_pad, g_pad

  # ------------------------------------------------------------------ request slots / page table
  def slot(self, request) -> int:
    slot = self._slot_of.get(request.request_id)
    if slot is None:
      if not self._free_slots:
        raise RuntimeError(f"more than max_batch_size={self.max_batch_size} requests hold pages")
      slot = self._slot_of[request.request_id] = self._free_slots.pop()
      self._synced[slot] = []
    return slot

  def release(self, request) -> None:
    """The request no longer holds pages (finished, cancelled, preempted): its table row is free."""
    slot = self._slot_of.pop(request.request_id, None)
    if slot is not None:
      self._free_slots.append(slot)

  def _sync_table(self, seqs) -> TableUpdate | None:
    slots, cols, pages = [], [], []
    for s in seqs:
      r = s.request
      slot = self.slot(r)
      have, want = self._synced[slot], r.pages
      n = len(have)
      if len(want) >= n and want[:n] == have:  # the usual case: pages appended
        first = n
      else:  # pages replaced (admission into a reused slot, rollback): resend from the first difference
        first = next((i for i, (a, b) in enumerate(zip(have, want)) if a != b), min(n, len(want)))
      if first < len(want):
        slots += [slot] * (len(want) - first)
        cols += range(first, len(want))
        pages += want[first:]
      self._synced[slot] = list(want)
    if not slots:
      return None
    return TableUpdate(np.asarray(slots, np.int32), np.asarray(cols, np.int32), np.asarray(pages, np.int32))

  def _fill_tree(self, a, first: int, seq: int, root_row: int, root_pos: int, parents, request) -> int:
    """Tree members of one sequence: its root (the newest token, at root_row) then its nodes; returns the next
    free member index. Members see the root's context through the pages and their own ancestors."""
    n = 1 + len(parents)
    if first + n > self.tree_pad:
      raise RuntimeError(f"tree verification: {first + n} tree rows exceed the step's {self.tree_pad}")
    sl = slice(first, first + n)
    a.tree_rows[sl] = root_row + np.arange(n)
    a.tree_seqs[sl] = seq
    a.tree_ctx[sl] = self.policy.kv_len(request, root_pos)
    a.tree_mask[sl, sl] = ancestor_mask([-1] + [p + 1 for p in parents])  # the root is member 0
    return first + n

  # ------------------------------------------------------------------ the batch
  def build(self, schedule: Schedule, prev_rows: dict[int, int]) -> BuiltStep:
    """prev_rows: request id -> row of the previous (still running) step's sampled vector holding the
    request's newest token, for requests whose newest token the host does not know yet."""
    seqs = schedule.seqs
    shape = t_pad, s_pad, r_pad, g_pad = self.step_shape(schedule)
    width = self.table_width(seqs)
    b = StepBatch.empty(t_pad, s_pad, r_pad, g_pad, width, self.num_slots, self.tree_pad)
    a, sm = b.attn, b.sampling
    members = 0
    table_update = self._sync_table(seqs)
    a = a.replace(**self.policy.step_arrays(t_pad, s_pad))
    offset, row = 0, 0
    sample_rows = []
    for i, s in enumerate(seqs):
      r, n = s.request, s.num_tokens
      known = min(s.start + n - s.num_draft, r.num_resolved)  # tokens the host has
      if known > s.start:
        b.tokens[offset:offset + known - s.start] = r.token_slice(s.start, known)
      for pos in range(known, s.start + n - s.num_draft):  # the newest token, still on the device
        if r.request_id not in prev_rows or pos != r.num_resolved:
          raise RuntimeError(f"request {r.request_id}: token at position {pos} is unknown to the host")
        b.prev_index[offset + pos - s.start] = prev_rows[r.request_id]
      if s.num_draft:
        b.tokens[offset + n - s.num_draft:offset + n] = s.draft_tokens
      linear = np.arange(s.start, s.start + n, dtype=np.int32)  # the slots: one per row, in order
      positions = linear
      if s.draft_parents is not None:  # a candidate tree: a node sits one place after its parent
        positions = linear.copy()
        positions[n - s.num_draft:] = s.start + n - s.num_draft + tree_depths(s.draft_parents)
        if s.is_tree:
          members = self._fill_tree(a, members, i, offset + n - s.num_draft - 1, int(positions[n - s.num_draft - 1]),
                                    s.draft_parents, r)
      a.positions[offset:offset + n] = positions
      a.slot_mapping[offset:offset + n] = self.policy.slot_mapping(r, linear)
      a.kv_lens[i] = self.policy.kv_len(r, s.start + n)
      self.policy.fill_rows(a, i, r, offset, linear)
      a.seq_slots[i] = self.slot(r)
      offset += n
      a.cu_q_lens[i + 1] = offset
      k = s.num_samples
      if k:
        sp = r.sampling
        sl = slice(row, row + k)
        sm.rows[sl] = np.arange(offset - k, offset)
        sm.positions[sl] = positions[n - k:] + 1
        sm.temperature[sl], sm.top_k[sl], sm.top_p[sl], sm.min_p[sl] = sp.temperature, sp.top_k, sp.top_p, sp.min_p
        sm.seeds[sl] = sp.seed
      sample_rows.append((row, k))
      row += k
    a.cu_q_lens[len(seqs) + 1:] = offset
    ps = self.page_size
    for g, group in enumerate(schedule.groups):
      members = slice(group.first, group.first + group.num_seqs)
      prefix = group.num_pages * ps
      a.group_table[g, :group.num_pages] = seqs[group.first].request.pages[:group.num_pages]
      a.group_lens[g] = prefix
      a.group_rows[g, :group.num_seqs] = a.cu_q_lens[members]
      a.seq_prefix_lens[members] = prefix
      if a.policy_weights is not None and a.policy_weights[a.group_rows[g, :group.num_seqs]].any():
        raise RuntimeError("a KV policy scores a row of a shared-prefix group (its mass over the prefix would be "
                           "lost): EvictionPolicy.plain_view must keep scoring sequences out of groups")
    if self.tree_pad:
      a = a.replace(num_tree_rows=np.int32(members))
    b = b.replace(attn=a.replace(num_seqs=np.int32(len(seqs))))
    decode_only = self.decode_buckets and offset == len(seqs) and not schedule.groups
    return BuiltStep(b, seqs, sample_rows, table_update, offset, shape, decode_only, width)
