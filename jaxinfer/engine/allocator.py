"""Host-side page allocator with reference counts.

The KV pool is `num_pages` fixed-size pages; a sequence owns a list of page ids (its page table row). A page
can be referenced by several sequences (prefix caching, copy-on-write, beam/parallel sampling share pages):
`incref` adds an owner, `decref` drops one, and the page returns to the free list when its count reaches 0.
Everything here is plain Python/NumPy: it runs on the host between device steps and never traces.
"""

from __future__ import annotations

from typing import Iterable

import numpy as np


class OutOfPagesError(RuntimeError):
  """Asked for more pages than the pool has free."""


class PageAllocator:
  """Free list + per-page reference counts over pages 0 .. num_pages-1.

  allocate(n) hands out n free pages with count 1; incref(pages) adds an owner to pages in use; decref(pages)
  (alias free) drops one owner from each and returns the ids that became free. Misuse (decref of a free
  page, incref of a free page, an id outside the pool) raises ValueError rather than corrupting the pool.
  """

  def __init__(self, num_pages: int):
    if not isinstance(num_pages, (int, np.integer)) or num_pages < 1:
      raise ValueError(f"num_pages must be a positive integer, got {num_pages!r}")
    self.num_pages = int(num_pages)
    self._refcount = np.zeros(self.num_pages, np.int32)
    # a stack: the most recently freed page is reused first; page 0 goes out first on a fresh pool
    self._free = list(range(self.num_pages - 1, -1, -1))

  # ------------------------------------------------------------------ queries
  @property
  def num_free(self) -> int:
    return len(self._free)

  @property
  def num_used(self) -> int:
    return self.num_pages - len(self._free)

  def refcount(self, page: int) -> int:
    self._check_ids([page])
    return int(self._refcount[page])

  def can_allocate(self, n: int) -> bool:
    return n <= len(self._free)

  # ------------------------------------------------------------------ updates
  def allocate(self, n: int) -> list[int]:
    """n fresh pages, each with reference count 1. Raises OutOfPagesError (taking nothing) if fewer are free."""
    if n < 0:
      raise ValueError(f"cannot allocate {n} pages")
    if n > len(self._free):
      raise OutOfPagesError(f"asked for {n} pages, {len(self._free)} of {self.num_pages} free")
    pages = [self._free.pop() for _ in range(n)]
    self._refcount[pages] = 1
    return pages

  def incref(self, pages: Iterable[int]) -> None:
    """One more owner for each page (each must be in use)."""
    pages = list(pages)
    self._check_ids(pages)
    for p in pages:
      if self._refcount[p] <= 0:
        raise ValueError(f"incref of page {p}, which is free")
    for p in pages:
      self._refcount[p] += 1

  def decref(self, pages: Iterable[int]) -> list[int]:
    """One owner fewer for each page; returns the pages whose count reached 0 (now free)."""
    freed = self._drop_references(pages)
    self._free.extend(reversed(freed))
    return freed

  def _drop_references(self, pages: Iterable[int]) -> list[int]:
    """Decrements each page's count (checked first, so a bad call changes nothing); returns those at 0."""
    pages = list(pages)
    self._check_ids(pages)
    counts: dict[int, int] = {}
    for p in pages:
      counts[p] = counts.get(p, 0) + 1
    for p, c in counts.items():
      if self._refcount[p] < c:
        raise ValueError(f"decref of page {p} {c} time(s) but its reference count is {self._refcount[p]}")
    released = []
    for p in pages:
      self._refcount[p] -= 1
      if self._refcount[p] == 0:
        released.append(p)
    return released

  free = decref

  def _check_ids(self, pages) -> None:
    for p in pages:
      if not 0 <= int(p) < self.num_pages:
        raise ValueError(f"page id {p} is outside the pool [0, {self.num_pages})")

  def check_consistency(self) -> None:
    """Free list and counts agree (no page both free and owned, none lost). Cheap; used by the tests."""
    free = set(self._free)
    assert len(free) == len(self._free), "a page appears twice in the free list"
    for p in range(self.num_pages):
      assert (p in free) == (self._refcount[p] == 0), f"page {p}: refcount {self._refcount[p]}, free={p in free}"
