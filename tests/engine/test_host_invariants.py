"""Host-side invariants of the scheduler, page allocator and prefix cache under thousands of random operations
(add / step / cancel / forced preemption / rollback), in sync and async (results one step late) modes. No
model and no device program: a simulated device stores, in every pool slot, the identity of the KV written
there (the token prefix it was computed from), so any page handed to the wrong request, copied from the wrong
place, reused before its write, or named in the cache for tokens it does not hold is caught at once.

Checked after every operation: each page's reference count equals its holders (requests + pinned copy
sources), the free list / evictable set / in-use pages partition the pool, the cache's tables agree with
each other, every cached page whose chain reaches the root holds exactly its chain's KV, and every step
reads only KV of its own sequence's prefix. At the end every request's tokens equal the simulated model's
own continuation, and every page is free or cached-and-idle.
"""

import numpy as np
import pytest

from jaxinfer.engine.allocator import PageAllocator
from jaxinfer.engine.kv_policy import PagedLayout
from jaxinfer.engine.output import OutputProcessor
from jaxinfer.engine.prefix_cache import ROOT_HASH, PrefixCachingAllocator
from jaxinfer.engine.request import Request, Status
from jaxinfer.engine.scheduler import Scheduler
from jaxinfer.engine.speculative import Proposer
from jaxinfer.generation.sampling import SamplingParams

VOCAB = 11  # small: stop tokens and repeated n-grams happen


def next_token(prefix: tuple) -> int:
  """The simulated model: a fixed function of the whole prefix."""
  return hash(("model", prefix)) % VOCAB


def continuation(prompt, n, stops):
  toks, out = list(prompt), []
  for _ in range(n):
    t = next_token(tuple(toks))
    out.append(t)
    toks.append(t)
    if t in stops:
      break
  return out


class RandomDrafts(Proposer):
  """Drafts that are right (the model's own continuation) or wrong at random."""

  def __init__(self, rng):
    self.rng = rng

  def propose(self, request, max_tokens):
    toks, out = request.prompt + request.output, []
    for _ in range(int(self.rng.integers(0, max_tokens + 1))):
      t = next_token(tuple(toks)) if self.rng.random() < 0.7 else int(self.rng.integers(0, VOCAB))
      out.append(t)
      toks.append(t)
    return out


class SimulatedEngine:
  """The engine's host loop over the real Scheduler / allocators / OutputProcessor, with a device simulated
  in Python (slot -> the prefix whose KV it holds)."""

  def __init__(self, rng, *, page_size, num_pages, max_batch_size, max_step_tokens, caching, async_mode, spec,
               chunked=True):
    self.ps, self.num_pages = page_size, num_pages
    self.allocator = PrefixCachingAllocator(num_pages) if caching else PageAllocator(num_pages)
    self.scheduler = Scheduler(self.allocator, page_size=page_size, max_batch_size=max_batch_size,
                               max_step_tokens=max_step_tokens, chunked_prefill=chunked, prefix_caching=caching,
                               group_prefixes=caching, proposer=RandomDrafts(rng) if spec else None,
                               max_rows_per_seq=4 if spec else 1)
    self.layout = PagedLayout(page_size, num_pages * page_size)
    self.stats = {"partial_prefills": 0, "generated_tokens": 0, "spec_draft_tokens": 0, "spec_accepted_tokens": 0,
                  "spec_verify_steps": 0}
    self.processor = OutputProcessor(self.scheduler, self.stats, self._finish)
    self.content: dict[int, tuple] = {}  # slot -> prefix tuple whose KV it holds
    self.device_tokens: dict[int, list[int]] = {}  # request id -> tokens sampled by steps not processed yet
    self.requests: dict[int, Request] = {}
    self.finished: dict[int, Request] = {}
    self.inflight = None
    self.async_mode = async_mode and not spec
    self.next_id = 0

  def _finish(self, request, reason):
    self.scheduler.release(request)
    request.finish_reason = reason
    self.finished[request.request_id] = self.requests.pop(request.request_id)

  def add(self, prompt, max_new, stops=frozenset()):
    r = Request(self.next_id, list(prompt), SamplingParams(), max_new, frozenset(stops), arrival=self.next_id)
    self.next_id += 1
    self.requests[r.request_id] = r
    self.scheduler.add(r)

  # ------------------------------------------------------------------ the simulated device
  def _true_tokens(self, r):
    return r.prompt + r.output + self.device_tokens.get(r.request_id, [])

  def _run_on_device(self, schedule):
    ps = self.ps
    for src, dst in schedule.copies:
      for off in range(ps):
        self.content[dst * ps + off] = self.content.get(src * ps + off)
    rows = []
    writes = []
    for s in schedule.seqs:
      r = s.request
      toks = self._true_tokens(r) + s.draft_tokens
      assert s.start + s.num_tokens <= len(toks) and (s.start + s.num_tokens == len(toks)) == s.samples
      positions = np.arange(s.start, s.start + s.num_tokens)
      for p, slot in zip(positions, self.layout.slot_mapping(r, positions)):
        writes.append((int(slot), tuple(toks[:p + 1])))
    slots = [w[0] for w in writes]
    assert len(slots) == len(set(slots)), "two tokens of one step write the same slot"
    for slot, prefix in writes:  # every layer writes the step's k/v before attending
      self.content[slot] = prefix
    for s in schedule.seqs:
      r = s.request
      toks = self._true_tokens(r) + s.draft_tokens
      kv_len = s.start + s.num_tokens
      for p in range(kv_len):
        slot = r.pages[p // ps] * ps + p % ps
        assert self.content.get(slot) == tuple(toks[:p + 1]), f"request {r.request_id} reads wrong KV at {p}"
      samples = [next_token(tuple(toks[:kv_len - s.num_samples + 1 + i])) for i in range(s.num_samples)]
      rows.append(samples)
    return rows

  # ------------------------------------------------------------------ host loop (as Engine._launch/_process)
  def _launch(self):
    schedule = self.scheduler.schedule()
    if not schedule.seqs:
      self.scheduler.release_copy_sources()
      return None
    rows = self._run_on_device(schedule)
    self.scheduler.release_copy_sources()
    self.scheduler.dispatched(schedule)
    tokens, sample_rows = [], []
    for s, samples in zip(schedule.seqs, rows):
      sample_rows.append((len(tokens), len(samples)))
      tokens += samples
      if samples and not s.draft_tokens:
        self.device_tokens.setdefault(s.request.request_id, []).append(samples[-1])
    built = type("Built", (), {"seqs": schedule.seqs, "sample_rows": sample_rows})
    return built, np.asarray(tokens, np.int32)

  def _process(self, launched):
    built, tokens = launched
    for s, (_, k) in zip(built.seqs, built.sample_rows):
      if k and not s.draft_tokens:
        self.device_tokens[s.request.request_id].pop(0)
    self.processor.process(built, tokens, None)

  def step(self):
    launched = self._launch()
    if self.async_mode:
      previous, self.inflight = self.inflight, launched
      if previous is not None:
        self._process(previous)
    elif launched is not None:
      self._process(launched)

  def drain(self):
    if self.inflight is not None:
      self._process(self.inflight)
      self.inflight = None

  # ------------------------------------------------------------------ invariants
  def check(self):
    self.allocator.check_consistency()
    holders = {}
    for r in self.scheduler.running + self.scheduler.waiting:
      assert r.status in (Status.RUNNING, Status.WAITING)
      assert len(set(r.pages)) == len(r.pages), f"request {r.request_id} holds a page twice"
      for p in r.pages:
        holders[p] = holders.get(p, 0) + 1
      assert r.num_computed <= r.num_tokens and len(r.output) <= r.max_new_tokens
    for p in self.scheduler._pinned:
      holders[p] = holders.get(p, 0) + 1
    for p in range(self.num_pages):
      assert self.allocator.refcount(p) == holders.get(p, 0), f"page {p}"
    if isinstance(self.allocator, PrefixCachingAllocator):
      self._check_chains()

  def _check_chains(self):
    cache, ps = self.allocator, self.ps
    for page, (h, parent, toks) in cache._entry.items():
      chain = [toks]
      while parent != ROOT_HASH:
        up = cache._page_of_hash.get(parent)
        if up is None:
          chain = None  # an ancestor was evicted: nothing to compare against
          break
        _, parent, up_toks = cache._entry[up]
        chain.append(up_toks)
      if chain is None:
        continue
      tokens = [t for part in reversed(chain) for t in part]
      start = len(tokens) - ps
      for off in range(ps):
        want = tuple(tokens[:start + off + 1])
        assert self.content.get(page * ps + off) == want, f"cached page {page} does not hold its chain's KV"


def _random_prompt(rng, prefixes):
  own = rng.integers(0, VOCAB, size=int(rng.integers(1, 14))).tolist()
  c = int(rng.integers(0, len(prefixes) + 1))
  if c == len(prefixes):
    return own
  base = prefixes[c]
  return base[:int(rng.integers(1, len(base) + 1))] + own


def _simulate(seed, ops):
  rng = np.random.default_rng(seed)
  ps = int(rng.choice([2, 4, 8]))
  caching = bool(rng.integers(0, 4))  # mostly on
  spec = rng.random() < 0.25
  async_mode = rng.random() < 0.6
  max_batch = int(rng.integers(2, 7))
  budget = int(rng.integers(max_batch, 4 * max_batch + 8))
  longest = 48
  num_pages = int(rng.integers(-(-longest // ps) + 1, 3 * -(-longest // ps)))
  sim = SimulatedEngine(rng, page_size=ps, num_pages=num_pages, max_batch_size=max_batch, max_step_tokens=budget,
                        caching=caching, async_mode=async_mode, spec=spec)
  prefixes = [rng.integers(0, VOCAB, size=int(n)).tolist() for n in (12, 20)]
  expected = {}
  for _ in range(ops):
    op = rng.random()
    if op < 0.25 and len(sim.scheduler.waiting) < 12:
      prompt = _random_prompt(rng, prefixes)[:longest - 12]
      max_new = int(rng.integers(1, longest - len(prompt)))
      stops = {int(rng.integers(0, VOCAB))} if rng.random() < 0.3 else set()
      expected[sim.next_id] = (prompt, max_new, stops)
      sim.add(prompt, max_new, stops)
    elif op < 0.85:
      sim.step()
    elif op < 0.9 and sim.requests:
      rid = int(rng.choice(list(sim.requests)))
      sim._finish(sim.requests[rid], "cancelled")
      expected.pop(rid)
    elif op < 0.95:
      running = [r for r in sim.scheduler.running if not r.num_inflight]
      if running:
        sim.scheduler.preempt(running[int(rng.integers(0, len(running)))])
    else:
      sim.drain()
      candidates = [r for r in sim.scheduler.running if r.output]
      if candidates:
        r = candidates[int(rng.integers(0, len(candidates)))]
        n = int(rng.integers(1, len(r.output) + 1))
        sim.scheduler.rollback(r, n)
    sim.check()
  steps = 0
  while sim.requests or sim.inflight is not None:
    sim.step()
    sim.check()
    steps += 1
    assert steps < 5000, "no progress"
  for rid, (prompt, max_new, stops) in expected.items():
    got = sim.finished[rid].output
    assert got == continuation(prompt, max_new, stops), f"seed {seed}: request {rid}"
  assert all(sim.allocator.refcount(p) == 0 for p in range(num_pages))
  return sim


@pytest.mark.parametrize("block", range(4))
def test_random_operations_keep_every_invariant(block):
  for seed in range(block * 50, block * 50 + 50):
    _simulate(seed, ops=60)


def test_rollback_into_a_cached_page_recomputes_into_a_fresh_one():
  rng = np.random.default_rng(0)
  sim = SimulatedEngine(rng, page_size=4, num_pages=16, max_batch_size=2, max_step_tokens=16, caching=True,
                        async_mode=False, spec=False)
  sim.add(list(range(6)), 10)
  for _ in range(8):
    sim.step()
  r = sim.requests[0]
  assert len(r.output) == 8 and sim.allocator.is_cached(r.pages[2])  # tokens 8..11 fill page 2
  cached = r.pages[2]
  released = sim.scheduler.rollback(r, 4)  # keeps 10 tokens: the cut falls inside page 2
  assert cached in released and sim.allocator.is_cached(cached) and r.num_computed == 8
  while sim.requests:
    sim.step()
    sim.check()
  assert sim.finished[0].output == continuation(list(range(6)), 10, set())
