"""PageAllocator: allocation, reference counts (shared pages), freeing, misuse."""

import pytest

from jaxinfer.engine import OutOfPagesError, PageAllocator


def test_allocate_and_free_returns_every_page():
  a = PageAllocator(8)
  first = a.allocate(3)
  second = a.allocate(5)
  assert sorted(first + second) == list(range(8)) and a.num_free == 0
  assert all(a.refcount(p) == 1 for p in first + second)
  with pytest.raises(OutOfPagesError, match="asked for 1 pages, 0 of 8 free"):
    a.allocate(1)
  assert a.decref(first) == first
  assert a.num_free == 3
  a.free(second)
  assert a.num_free == 8 and a.num_used == 0
  a.check_consistency()


def test_shared_pages_are_freed_by_their_last_owner():
  a = PageAllocator(4)
  pages = a.allocate(2)
  a.incref(pages)  # a second sequence shares both pages (prefix caching, copy-on-write)
  a.incref(pages[:1])  # and a third the first one
  assert [a.refcount(p) for p in pages] == [3, 2]
  assert a.decref(pages) == []
  assert a.num_free == 2
  assert a.decref(pages) == [pages[1]]
  assert a.decref(pages[:1]) == [pages[0]]
  assert a.num_free == 4
  a.check_consistency()


def test_failed_allocation_takes_nothing():
  a = PageAllocator(3)
  a.allocate(2)
  with pytest.raises(OutOfPagesError):
    a.allocate(2)
  assert a.num_free == 1 and a.can_allocate(1) and not a.can_allocate(2)
  a.check_consistency()


def test_misuse_is_an_error_not_corruption():
  a = PageAllocator(4)
  (p,) = a.allocate(1)
  with pytest.raises(ValueError, match="outside the pool"):
    a.decref([7])
  with pytest.raises(ValueError, match="which is free"):
    a.incref([(p + 1) % 4])
  with pytest.raises(ValueError, match="reference count is 1"):
    a.decref([p, p])  # a double free is refused as a whole
  assert a.refcount(p) == 1
  a.decref([p])
  with pytest.raises(ValueError, match="reference count is 0"):
    a.decref([p])
  with pytest.raises(ValueError):
    PageAllocator(0)
  a.check_consistency()
