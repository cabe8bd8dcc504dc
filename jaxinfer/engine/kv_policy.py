"""KV policies: where each new token's k/v goes (the slot mapping the host sends with every step).

A policy sees a request's pages and the positions of its new tokens and returns flat pool slots
(page * page_size + offset). The paged attention kernels read token p of a sequence from page
page_table[p // page_size], offset p % page_size, so the default layout writes there too. A KV-cache eviction
or compaction policy is a new KVPolicy subclass in its own file: it may map tokens to other slots (keeping
the pool's slot positions with EngineConfig.track_slot_positions) and drop or move pages between steps; the
scheduler, batch builder and model runner call it through this one method and nothing else changes.
"""

from __future__ import annotations

import numpy as np


class KVPolicy:
  """Interface: slot_mapping(request, positions) -> int32 slots, one per new token."""

  def slot_mapping(self, request, positions: np.ndarray) -> np.ndarray:
    raise NotImplementedError

  # what the batch builder asks besides the slot mapping (defaults: the plain layout, no policy state)
  def kv_len(self, request, end: int) -> int:
    """Slots the request's page-table row holds once its tokens up to position `end` are written."""
    return end

  def step_arrays(self, t_pad: int, s_pad: int) -> dict:
    """Extra AttentionMetadata arrays the policy fills per step (names of fields, NumPy arrays)."""
    return {}

  def fill_rows(self, attn, i: int, request, offset: int, positions: np.ndarray) -> None:
    """Fills the policy's arrays for sequence i (rows offset .. offset + len(positions))."""


class PagedLayout(KVPolicy):
  """The vLLM layout: token p of a request goes to page request.pages[p // page_size], offset p % page_size."""

  def __init__(self, page_size: int, num_slots: int):
    self.page_size = page_size
    self.num_slots = num_slots

  def slot_mapping(self, request, positions: np.ndarray) -> np.ndarray:
    ps = self.page_size
    pages = np.asarray(request.pages, np.int32)
    index = positions // ps
    if index.size and index.max() >= pages.size:
      raise RuntimeError(f"request {request.request_id}: position {int(positions.max())} has no page "
                         f"({pages.size} pages of {ps})")
    return pages[index] * ps + positions % ps
