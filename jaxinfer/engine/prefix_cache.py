"""Prefix caching: full KV pages named by a chain hash of their tokens, kept after use and shared by requests.

A full page of tokens is identified by hash(parent_hash, tuple(page_tokens)), the parent being the hash of the
page before it (ROOT_HASH for the first): equal hashes mean equal tokens AND equal everything before them, so
equal KV (the model is a function of the token prefix). Only full pages are named; a page enters the cache
when the step that completes it is scheduled (a request admitted later in the same step may already read it:
every layer writes the step's new k/v into the pool before it attends).

PrefixCachingAllocator is a PageAllocator whose pages are in one of three states:
  in use     refcount > 0 (possibly cached too: then other requests may share it)
  evictable  refcount 0 and cached: its KV is kept in case a later request has the same prefix
  free       refcount 0, nothing worth keeping
Evictable pages count as free: `allocate` takes free pages first, then evicts cached ones least recently used
first (pages released together go tail first, so a prefix's last pages leave before its first ones, which
more requests share). `acquire` takes a reference on a cached page, reviving it if it was evictable.

For divergence inside a page (or a fully cached prompt, whose last token must still run to give logits) the
cache also answers "which cached page, following this parent, starts with the most of these tokens"
(`best_partial`): the scheduler copies that page into a fresh one (copy-on-write) and skips recomputing the
common tokens. Hash collisions cannot corrupt anything: a hit is only taken when the stored parent hash and
tokens of the page match too.
"""

from __future__ import annotations

import collections
from typing import Iterable, Sequence

from jaxinfer.engine.allocator import OutOfPagesError, PageAllocator

ROOT_HASH = hash(("jaxinfer.prefix_cache", 0))


def page_hash(parent_hash: int, tokens: Sequence[int]) -> int:
  """Chain hash of a full page: its tokens and (through parent_hash) every token before them."""
  return hash((parent_hash, tuple(tokens)))


class PrefixCachingAllocator(PageAllocator):
  """PageAllocator + a hash table of full, computed pages that outlive their requests until evicted (LRU)."""

  def __init__(self, num_pages: int):
    super().__init__(num_pages)
    self._page_of_hash: dict[int, int] = {}
    self._entry: dict[int, tuple[int, int, tuple]] = {}  # page -> (hash, parent hash, tokens)
    self._children: dict[int, dict[int, tuple]] = {}  # parent hash -> {page: tokens} (partial matches)
    self._evictable: collections.OrderedDict[int, None] = collections.OrderedDict()  # first = evicted first
    self.num_evictions = 0

  # ------------------------------------------------------------------ queries
  @property
  def num_free(self) -> int:
    """Pages allocate() can hand out: free ones plus cached ones nobody uses (evicted on demand)."""
    return len(self._free) + len(self._evictable)

  @property
  def num_evictable(self) -> int:
    return len(self._evictable)

  @property
  def num_cached(self) -> int:
    """Pages in the hash table (in use or evictable)."""
    return len(self._entry)

  def can_allocate(self, n: int) -> bool:
    return n <= self.num_free

  def is_cached(self, page: int) -> bool:
    return page in self._entry

  def lookup(self, h: int, parent: int, tokens: tuple) -> int | None:
    """The cached page with this chain hash (checked against its parent and tokens), or None."""
    page = self._page_of_hash.get(h)
    if page is None:
      return None
    _, p, t = self._entry[page]
    return page if (p == parent and t == tokens) else None

  def best_partial(self, parent: int, tokens: Sequence[int], exclude=()) -> tuple[int | None, int]:
    """(page, m): the cached page following `parent` whose first m tokens equal tokens[:m], m largest (>= 1),
    or (None, 0). Pages in `exclude` (not yet computed) are skipped."""
    best, best_m = None, 0
    for page, toks in self._children.get(parent, {}).items():
      if page in exclude:
        continue
      m = 0
      for a, b in zip(toks, tokens):
        if a != b:
          break
        m += 1
      if m > best_m:
        best, best_m = page, m
    return best, best_m

  # ------------------------------------------------------------------ updates
  def register(self, page: int, h: int, parent: int, tokens: tuple) -> bool:
    """Names an in-use, full page by its chain hash. False (nothing changes) when the page is already named
    or another page holds the same hash (two requests computed the same prefix at once: the first wins, the
    duplicate is freed normally when its request ends)."""
    self._check_ids([page])
    if self._refcount[page] <= 0:
      raise ValueError(f"register of page {page}, which is not in use")
    if page in self._entry or h in self._page_of_hash:
      return False
    self._page_of_hash[h] = page
    self._entry[page] = (h, parent, tuple(tokens))
    self._children.setdefault(parent, {})[page] = tuple(tokens)
    return True

  def acquire(self, pages: Iterable[int]) -> None:
    """One more owner for each cached or in-use page; an evictable page comes back into use."""
    pages = list(pages)
    self._check_ids(pages)
    for p in pages:
      if self._refcount[p] <= 0 and p not in self._evictable:
        raise ValueError(f"acquire of page {p}, which is free and not cached")
    for p in pages:
      if self._refcount[p] == 0:
        del self._evictable[p]
      self._refcount[p] += 1

  def allocate(self, n: int) -> list[int]:
    if n < 0:
      raise ValueError(f"cannot allocate {n} pages")
    if n > self.num_free:
      raise OutOfPagesError(f"asked for {n} pages, {self.num_free} of {self.num_pages} free "
                            f"({len(self._evictable)} of them cached)")
    pages = [self._free.pop() for _ in range(min(n, len(self._free)))]
    while len(pages) < n:
      page, _ = self._evictable.popitem(last=False)
      self._forget(page)
      self.num_evictions += 1
      pages.append(page)
    self._refcount[pages] = 1
    return pages

  def decref(self, pages: Iterable[int]) -> list[int]:
    """One owner fewer for each page (given in sequence order); returns the pages whose count reached 0.
    Cached ones become evictable (most recently used; the sequence's tail ahead of its head in the eviction
    order), the others free."""
    pages = list(pages)
    released = self._drop_references(pages)
    plain = [p for p in released if p not in self._entry]
    self._free.extend(reversed(plain))
    for p in reversed(released):
      if p in self._entry:
        self._evictable[p] = None
    return released

  free = decref

  def _forget(self, page: int) -> None:
    h, parent, _ = self._entry.pop(page)
    del self._page_of_hash[h]
    siblings = self._children[parent]
    del siblings[page]
    if not siblings:
      del self._children[parent]

  def reset_cache(self) -> int:
    """Drops every evictable page from the cache (they become plain free pages); returns how many."""
    n = len(self._evictable)
    while self._evictable:
      page, _ = self._evictable.popitem(last=False)
      self._forget(page)
      self._free.append(page)
    return n

  def check_consistency(self) -> None:
    """Every page is exactly one of free / evictable / in use; the hash table agrees with itself."""
    free = set(self._free)
    assert len(free) == len(self._free), "a page appears twice in the free list"
    ev = set(self._evictable)
    assert not free & ev, f"pages both free and evictable: {sorted(free & ev)}"
    for p in range(self.num_pages):
      idle = p in free or p in ev
      assert idle == (self._refcount[p] == 0), f"page {p}: refcount {self._refcount[p]}, free={p in free}, " \
                                               f"evictable={p in ev}"
      if p in ev:
        assert p in self._entry, f"evictable page {p} is not cached"
      if p in free:
        assert p not in self._entry, f"free page {p} is still cached"
    assert len(self._page_of_hash) == len(self._entry)
    for page, (h, parent, toks) in self._entry.items():
      assert self._page_of_hash[h] == page and self._children[parent][page] == toks
    assert sum(len(c) for c in self._children.values()) == len(self._entry)
