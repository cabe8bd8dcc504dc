"""Prefix caching: cached pages are reused (reference-counted, copy-on-write, evicted LRU only for room), the
outputs stay exactly jaxinfer.generate's, and every page reference comes back when the work is done."""

import numpy as np
import pytest

import jaxinfer
from jaxinfer.engine import Engine, OutOfPagesError, RequestRejected
from jaxinfer.engine.prefix_cache import ROOT_HASH, PrefixCachingAllocator, page_hash

from testlib import tiny_model_config

CFG = tiny_model_config()

PAGE = 4
# Two engine shapes for every test here (each distinct pool / bucket set costs a few compiled programs): one
# bucket of tokens and of sequences, so 3 step programs each (no group, 1 group, 2 groups).
ROOMY = dict(max_batch_size=8, page_size=PAGE, num_pages=96, max_step_tokens=32, min_token_bucket=32,
             min_seq_bucket=8, max_prefix_groups=2, enable_prefix_caching=True, enable_shared_prefix_attention=True)
TIGHT = dict(max_batch_size=4, page_size=PAGE, num_pages=16, max_step_tokens=16, min_token_bucket=16,
             min_seq_bucket=4, max_model_len=80, max_prefix_groups=2, enable_prefix_caching=True,
             enable_shared_prefix_attention=True)


# ------------------------------------------------------------------------------------------------ allocator


def test_allocator_keeps_cached_pages_until_it_needs_room_and_evicts_lru_tail_first():
  a = PrefixCachingAllocator(6)
  seq = a.allocate(3)  # a sequence of 3 full pages
  hashes, parent = [], ROOT_HASH
  for i, page in enumerate(seq):
    toks = (i, i, i, i)
    hashes.append(page_hash(parent, toks))
    assert a.register(page, hashes[-1], parent, toks)
    parent = hashes[-1]
  assert not a.register(seq[0], hashes[0], ROOT_HASH, (0, 0, 0, 0))  # named already
  other = a.allocate(1)
  assert not a.register(other[0], hashes[0], ROOT_HASH, (0, 0, 0, 0))  # a duplicate stays uncached
  assert a.decref(seq) == seq and a.decref(other) == other
  assert a.num_free == 6 and a.num_evictable == 3 and a.num_cached == 3
  a.check_consistency()
  # lookups check the stored parent and tokens, not only the hash
  assert a.lookup(hashes[1], hashes[0], (1, 1, 1, 1)) == seq[1]
  assert a.lookup(hashes[1], hashes[0], (1, 1, 1, 2)) is None
  assert a.best_partial(hashes[1], [2, 2, 7]) == (seq[2], 2)
  assert a.best_partial(hashes[1], [2, 2, 7], exclude={seq[2]}) == (None, 0)
  a.acquire(seq[:1])  # a hit revives page 0
  assert a.refcount(seq[0]) == 1 and a.num_evictable == 2
  # 3 plain free pages go first, then cached ones, the sequence's tail first
  fresh = a.allocate(4)
  assert seq[2] in fresh and seq[1] not in fresh and a.num_evictions == 1
  assert a.lookup(hashes[2], hashes[1], (2, 2, 2, 2)) is None and a.num_cached == 2
  assert a.allocate(1) == [seq[1]] and a.num_evictions == 2
  with pytest.raises(OutOfPagesError, match="0 of 6 free"):
    a.allocate(1)
  a.check_consistency()
  with pytest.raises(ValueError, match="free and not cached"):
    a.decref(fresh[:1])
    a.acquire(fresh[:1])
  a.decref(fresh[1:] + [seq[1]])
  a.decref(seq[:1])
  assert a.num_free == 6 and a.num_evictable == 1  # page 0 is still cached
  assert a.reset_cache() == 1 and a.num_cached == 0
  a.check_consistency()


# ------------------------------------------------------------------------------------------------ workload


@pytest.fixture(scope="module")
def workload(model):
  """Prompts sharing a 40-token prefix to several lengths (page multiples and not), prompts identical to
  earlier ones, a follow-up turn that extends a prompt with its own answer, and unrelated ones; with the
  greedy outputs of jaxinfer.generate run on each alone."""
  rng = np.random.default_rng(0)
  base = rng.integers(0, CFG.vocab_size, size=40).tolist()
  own = lambda n: rng.integers(0, CFG.vocab_size, size=n).tolist()  # noqa: E731
  first = [base]  # computed alone first: everything after can hit its pages
  first_out = [jaxinfer.generate(model, [base], 6)[0]]
  prompts = [
      base[:40] + own(3),  # the whole cached prefix, then its own tokens
      list(base),  # identical to a cached prompt (a page multiple): its last page is copied, 1 token recomputed
      base[:13] + own(6),  # diverges inside a page: 12 tokens reused as pages, 1 more through a page copy
      base[:22] + own(5),
      base[:8] + own(9),  # diverges exactly at a page boundary
      base[:30],  # a prefix of a cached prompt, ending inside a page
      base + first_out[0] + own(2),  # a follow-up turn: the cached pages include generated tokens
      own(17),  # unrelated
      base[:36] + own(2),
  ]
  prompts += [list(prompts[2]), list(prompts[7])]  # identical to prompts computed in this same run
  new = [5, 8, 3, 9, 6, 4, 7, 8, 5, 9, 6]
  expected = [jaxinfer.generate(model, [p], k)[0] for p, k in zip(prompts, new)]
  return dict(first=first, first_out=first_out, prompts=prompts, new=new, expected=expected)


def _serve(engine, workload, burst=4):
  """First prompt alone, then the rest in bursts while others decode. Returns outputs in prompt order."""
  assert engine.run(workload["first"], max_new_tokens=6, progress=False) == workload["first_out"]
  prompts, new = workload["prompts"], workload["new"]
  got, index_of = {}, {}
  arrived, steps = 0, 0
  while arrived < len(prompts) or engine.has_unfinished():
    if arrived < len(prompts) and steps % 3 == 0:
      for i in range(arrived, min(len(prompts), arrived + burst)):
        index_of[engine.add_request(prompts[i], max_new_tokens=new[i])] = i
      arrived = min(len(prompts), arrived + burst)
    for out in engine.step():
      got.setdefault(index_of[out.request_id], []).extend(out.new_token_ids)
    engine.check_pages()  # counts match the holders at every step
    steps += 1
    assert steps < 500
  return [got[i] for i in range(len(prompts))]


def test_prefix_caching_and_shared_prefix_attention_match_generate(model, workload):
  engine = Engine(model, **ROOMY)
  assert _serve(engine, workload) == workload["expected"]
  ps = engine.prefix_stats
  # every prompt but the unrelated one hits; the identical ones reuse all but their last token
  assert ps["hits"] >= 9 and ps["copies"] >= 3, ps
  assert ps["hit_tokens"] >= 40 + 39 + 12 + 20 + 8 + 28 + 40 + 36 + 18 + 16, ps
  assert engine.stats["shared_prefix_groups"] > 0 and engine.stats["shared_prefix_seqs"] > 0, engine.stats
  pages = engine.check_pages()
  assert pages["in_use"] == 0 and pages["cached_idle"] > 0 and pages["free"] + pages["cached_idle"] == 96
  assert engine.max_programs == 3 and engine.compilations <= 3


def test_tight_pool_preempts_evicts_and_still_matches_generate(model, workload):
  # 16 pages of 4 tokens: about two requests at a time, so running requests are preempted and cached pages
  # are evicted; preempted requests come back through the cache
  engine = Engine(model, **TIGHT)
  assert _serve(engine, workload, burst=6) == workload["expected"]
  assert engine.stats["preemptions"] > 0 and engine.prefix_stats["evictions"] > 0, \
      (engine.stats, engine.prefix_stats)
  assert engine.prefix_stats["hits"] > 0
  assert engine.check_pages()["in_use"] == 0


# ------------------------------------------------------------------------------------------------ bad input


def test_a_prefix_filling_the_whole_pool(model):
  """16 pages of 4: a 60-token prompt + 4 new tokens takes the whole pool. Requests sharing its prefix wait for
  it (admission never preempts), then reuse its cached pages; an unrelated one evicts them; a prompt beyond
  the pool is refused without touching the cache; a recomputed prompt still gives the same tokens."""
  rng = np.random.default_rng(3)
  big = rng.integers(0, CFG.vocab_size, size=60).tolist()
  sharing = big[:50] + rng.integers(0, CFG.vocab_size, size=9).tolist()
  unrelated = rng.integers(0, CFG.vocab_size, size=58).tolist()
  want = {name: jaxinfer.generate(model, [p], 4)[0]
          for name, p in (("big", big), ("sharing", sharing), ("unrelated", unrelated))}
  engine = Engine(model, **TIGHT)
  assert engine.run([big], max_new_tokens=4, progress=False) == [want["big"]]
  # every full page is cached; the last one never filled (the last sampled token is never run)
  assert engine.check_pages() == {"free": 1, "cached_idle": 15, "in_use": 0}
  with pytest.raises(RequestRejected, match="need 18 pages of 4, but the pool only has num_pages=16"):
    engine.add_request(big + [1], max_new_tokens=8)
  assert engine.allocator.num_cached == 15 and not engine.has_unfinished()
  got = engine.run([sharing, big, unrelated, big], max_new_tokens=4, progress=False)
  assert got == [want["sharing"], want["big"], want["unrelated"], want["big"]]
  assert engine.prefix_stats["evictions"] > 0 and engine.prefix_stats["hits"] >= 2, engine.prefix_stats
  assert engine.check_pages()["in_use"] == 0


def test_cancelling_a_request_whose_pages_others_share(model):
  rng = np.random.default_rng(4)
  base = rng.integers(0, CFG.vocab_size, size=24).tolist()
  prompts = [base + rng.integers(0, CFG.vocab_size, size=n).tolist() for n in (2, 5, 1, 7)]
  expected = [jaxinfer.generate(model, [p], 10)[0] for p in prompts[1:3]]
  engine = Engine(model, **ROOMY)
  owner = engine.add_request(prompts[0], max_new_tokens=10)  # computes the shared pages
  engine.step()
  keep = [engine.add_request(p, max_new_tokens=10) for p in prompts[1:3]]
  late = engine.add_request(prompts[3], max_new_tokens=10)
  got = {r: [] for r in keep}
  for _ in range(3):
    for out in engine.step():
      if out.request_id in got:
        got[out.request_id] += out.new_token_ids
  shared = engine.scheduler.running[0].pages[:6]
  assert all(engine.allocator.refcount(p) >= 3 for p in shared)  # owner + the others hold them
  assert engine.stats["shared_prefix_groups"] > 0
  assert engine.cancel(owner) and engine.cancel(late)
  assert all(engine.allocator.refcount(p) >= 2 for p in shared)  # the others still hold them
  engine.check_pages()
  finished = {}
  for out in engine.stream():
    if out.request_id in got:
      got[out.request_id] += out.new_token_ids
    if out.finished:
      finished[out.request_id] = out.finish_reason
  assert finished == {owner: "cancelled", late: "cancelled", keep[0]: "length", keep[1]: "length"}
  assert [got[r] for r in keep] == expected
  assert engine.check_pages()["in_use"] == 0


def test_requests_admitted_in_the_same_step_share_pages_that_step_computes(model):
  """Pages are named as soon as the step that fills them is scheduled: a request admitted later in the same
  step reads them (every layer writes its new k/v before attending), but never copies one (the copy would
  run before the step, from a page not computed yet)."""
  rng = np.random.default_rng(5)
  x = rng.integers(0, CFG.vocab_size, size=12).tolist()
  prompts = [x, x[:10] + rng.integers(0, CFG.vocab_size, size=3).tolist(), list(x)]
  expected = [jaxinfer.generate(model, [p], 5)[0] for p in prompts]
  engine = Engine(model, **ROOMY)
  ids = [engine.add_request(p, max_new_tokens=5) for p in prompts]
  got = {i: [] for i in ids}
  outs = engine.step()  # all three prefilled in one step
  assert len(outs) == 3 and engine.prefix_stats["hit_tokens"] == 2 * 8
  assert engine.prefix_stats["copies"] == 0
  for out in outs + list(engine.stream()):
    got[out.request_id] += out.new_token_ids
  assert [got[r] for r in ids] == expected
  assert engine.check_pages()["in_use"] == 0
