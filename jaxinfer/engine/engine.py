"""jaxinfer.Engine: continuous batching over a paged KV cache, with chunked prefill and preemption, and
optionally prefix caching (enable_prefix_caching) and shared-prefix attention (enable_shared_prefix_attention).

  engine = jaxinfer.Engine(model, max_batch_size=16, page_size=16, num_pages=256, max_step_tokens=128)
  rid = engine.add_request(prompt_ids, sampling=SamplingParams(temperature=0.8, seed=1), max_new_tokens=64)
  while engine.has_unfinished():
    for out in engine.step():           # RequestOutput(request_id, new_token_ids, finished, finish_reason, logprobs)
      ...
  engine.run(prompts, sampling, max_new_tokens)   # -> new-token lists in prompt order
  for out in engine.stream(): ...                  # every output until the engine is idle

The host side (request queues, page allocator, scheduler) is plain Python; the device side is one jitted
step function (jaxinfer/engine/step.py) whose shapes are padded to a few buckets.
"""

from __future__ import annotations

import logging
import time
from typing import Iterator, Sequence

import numpy as np
from flax import nnx

from jaxinfer.engine import step as step_lib
from jaxinfer.engine.allocator import PageAllocator
from jaxinfer.engine.paged_cache import PagedKVCache
from jaxinfer.engine.prefix_cache import PrefixCachingAllocator
from jaxinfer.engine.request import (CANCELLED, LENGTH, STOP, QueueFullError, Request, RequestOutput,
                                     RequestRejected, UnknownRequestError)
from jaxinfer.engine.scheduler import Scheduler
from jaxinfer.generation.sampling import SamplingParams

log = logging.getLogger("jaxinfer.engine")


def _positive_int(name: str, value) -> int:
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
    raise ValueError(f"Engine: {name} must be a positive integer, got {value!r}")
  return int(value)


class Engine:
  """Serves many requests at once on one model.

  Args:
    model: a jaxinfer Transformer. It is split once (nnx.split); later changes to it are not seen.
    max_batch_size: most requests running (holding pages) at once, and so most sequences in one step.
    page_size: tokens per KV page.
    num_pages: pages in the pool (per layer, k and v each). Default: enough for max_batch_size sequences of
      max_model_len tokens (no preemption ever needed).
    max_step_tokens: token budget of one step (decodes + prefill chunks); at least max_batch_size so that
      every running decode fits in every step.
    max_queue: most new requests waiting for admission; add_request raises QueueFullError beyond it.
    attention_impl: implementation of pallas_kernels.ragged_paged_attention (None: best for the backend).
    max_model_len: longest sequence (prompt + new tokens). Default: min(max_position_embeddings, pool size).
    chunked_prefill: split long prompts into chunks that share steps with decodes (default). False schedules
      every prompt whole; max_step_tokens must then be >= max_model_len + max_batch_size - 1.
    min_token_bucket, min_seq_bucket: smallest padded step sizes; the step's token count is padded to a power
      of two between min_token_bucket and max_step_tokens, the sequence count likewise up to max_batch_size,
      so at most len(token_buckets) * len(seq_buckets) programs are ever compiled.
    interpret: run Pallas attention kernels in interpret mode (CPU testing).
    separate_compile: before the first step of each (token, sequence) bucket, compile its program with an
      empty step timed into stats["compile_seconds"], so benchmarks can take compilation out of step times.
    enable_prefix_caching: keep full KV pages after their requests finish, named by a chain hash of their
      tokens, and let new requests reuse the pages of their longest cached prefix (reference-counted,
      copy-on-write, evicted least-recently-used only when the pool needs room).
    enable_shared_prefix_attention: decodes sharing prefix pages attend over the prefix once per group as a
      batched matrix product (Hydragen), merged with their own suffix attention by log-sum-exp. Needs
      enable_prefix_caching (pages are only shared through the cache).
    max_prefix_groups: most prefix groups in one step (the group count is padded to a power of two up to it).
    min_shared_prefix_pages: smallest shared prefix, in pages, worth a group.
    shared_prefix_impl: implementation of pallas_kernels.shared_prefix_attention.paged_prefix_attention.
  """

  def __init__(self, model, *, max_batch_size: int = 32, page_size: int = 16, num_pages: int | None = None,
               max_step_tokens: int = 256, max_queue: int = 1024, attention_impl: str | None = None,
               max_model_len: int | None = None, chunked_prefill: bool = True, min_token_bucket: int = 16,
               min_seq_bucket: int = 4, interpret: bool = False, separate_compile: bool = False,
               enable_prefix_caching: bool = False, enable_shared_prefix_attention: bool = False,
               max_prefix_groups: int = 4, min_shared_prefix_pages: int = 1, shared_prefix_impl: str | None = None):
    cfg = model.config
    self.config = cfg
    self.max_batch_size = _positive_int("max_batch_size", max_batch_size)
    self.page_size = _positive_int("page_size", page_size)
    self.max_step_tokens = _positive_int("max_step_tokens", max_step_tokens)
    self.max_queue = _positive_int("max_queue", max_queue)
    if max_model_len is None and num_pages is None:
      max_model_len = cfg.max_position_embeddings
    if num_pages is None:
      num_pages = self.max_batch_size * -(-max_model_len // self.page_size)
    self.num_pages = _positive_int("num_pages", num_pages)
    if max_model_len is None:
      max_model_len = min(cfg.max_position_embeddings, self.num_pages * self.page_size)
    self.max_model_len = _positive_int("max_model_len", max_model_len)
    if self.max_model_len > cfg.max_position_embeddings:
      raise ValueError(f"Engine: max_model_len={self.max_model_len} exceeds the model's max_position_embeddings="
                       f"{cfg.max_position_embeddings}")
    if self.max_step_tokens < self.max_batch_size:
      raise ValueError(f"Engine: max_step_tokens={self.max_step_tokens} must be >= max_batch_size="
                       f"{self.max_batch_size}, or running decodes could not all fit in one step")
    self.chunked_prefill = bool(chunked_prefill)
    if not self.chunked_prefill and self.max_step_tokens < self.max_model_len + self.max_batch_size - 1:
      raise ValueError(f"Engine: without chunked prefill max_step_tokens={self.max_step_tokens} must be >= "
                       f"max_model_len + max_batch_size - 1 = {self.max_model_len + self.max_batch_size - 1} "
                       "so a whole prompt always fits beside the running decodes")
    self.attention_impl = attention_impl
    self.interpret = bool(interpret)
    self.separate_compile = bool(separate_compile)
    self.enable_prefix_caching = bool(enable_prefix_caching)
    self.enable_shared_prefix_attention = bool(enable_shared_prefix_attention)
    if self.enable_shared_prefix_attention and not self.enable_prefix_caching:
      raise ValueError("Engine: enable_shared_prefix_attention=True needs enable_prefix_caching=True (sequences "
                       "only share prefix pages through the prefix cache)")
    self.max_prefix_groups = _positive_int("max_prefix_groups", max_prefix_groups)
    self.min_shared_prefix_pages = _positive_int("min_shared_prefix_pages", min_shared_prefix_pages)
    from pallas_kernels.shared_prefix_attention import PAGED_IMPLEMENTATIONS
    if shared_prefix_impl is not None and shared_prefix_impl not in PAGED_IMPLEMENTATIONS:
      raise ValueError(f"Engine: shared_prefix_impl={shared_prefix_impl!r} is not one of "
                       f"{sorted(PAGED_IMPLEMENTATIONS)}")
    self.shared_prefix_impl = shared_prefix_impl
    self._shapes_seen: set[tuple[int, int, int]] = set()
    self.pages_per_seq = -(-self.max_model_len // self.page_size)
    self.token_buckets = step_lib.buckets(min(_positive_int("min_token_bucket", min_token_bucket),
                                              self.max_step_tokens), self.max_step_tokens)
    self.seq_buckets = step_lib.buckets(min(_positive_int("min_seq_bucket", min_seq_bucket), self.max_batch_size),
                                        self.max_batch_size)
    # prefix-group counts a step may carry (0: no shared-prefix attention in that step)
    self.group_buckets = (0,) + (step_lib.buckets(1, self.max_prefix_groups)
                                 if self.enable_shared_prefix_attention else ())
    self.copy_buckets = step_lib.buckets(1, self.max_batch_size)

    self._graphdef, self._state = nnx.split(model)
    self._k_pages, self._v_pages = PagedKVCache.create_pools(cfg, self.num_pages, self.page_size)
    self.allocator = (PrefixCachingAllocator(self.num_pages) if self.enable_prefix_caching
                      else PageAllocator(self.num_pages))
    self.scheduler = Scheduler(self.allocator, page_size=self.page_size, max_batch_size=self.max_batch_size,
                               max_step_tokens=self.max_step_tokens, chunked_prefill=self.chunked_prefill,
                               prefix_caching=self.enable_prefix_caching,
                               group_prefixes=self.enable_shared_prefix_attention,
                               max_prefix_groups=self.max_prefix_groups,
                               min_shared_prefix_pages=self.min_shared_prefix_pages)
    self._requests: dict[int, Request] = {}  # unfinished
    self._finish_reasons: dict[int, str] = {}  # finished: id -> reason
    self._pending_outputs: list[RequestOutput] = []  # returned by the next step()
    self._next_id = 0
    self._compilations_at_start = step_lib.compilation_count()
    # steps run; requests preempted; tokens run through the model (real / padded); tokens sampled; prefill
    # chunks that ended before their prompt did (chunked prefill at work); most sequences in one step
    # prefix caching (see prefix_stats): page copies made; shared-prefix attention: groups run (summed over
    # steps), decode rows served through a group, prefix keys those rows did not each read again
    self.stats = {"steps": 0, "preemptions": 0, "scheduled_tokens": 0, "padded_tokens": 0, "generated_tokens": 0,
                  "partial_prefills": 0, "max_step_seqs": 0, "compile_seconds": 0.0, "shared_prefix_groups": 0,
                  "shared_prefix_seqs": 0, "shared_prefix_tokens_saved": 0}
    log.info("engine: %d pages x %d tokens (%d layers), max_batch_size=%d, max_step_tokens=%d, max_model_len=%d, "
             "chunked_prefill=%s, prefix caching %s, shared-prefix attention %s; token buckets %s, sequence "
             "buckets %s", self.num_pages, self.page_size, cfg.num_layers, self.max_batch_size, self.max_step_tokens,
             self.max_model_len, self.chunked_prefill, self.enable_prefix_caching,
             self.enable_shared_prefix_attention, self.token_buckets, self.seq_buckets)

  # ------------------------------------------------------------------ introspection
  @property
  def max_programs(self) -> int:
    """Upper bound on the step programs this engine can compile (page-copy programs not included: at most
    len(copy_buckets) more, with prefix caching)."""
    return len(self.token_buckets) * len(self.seq_buckets) * len(self.group_buckets)

  @property
  def prefix_stats(self) -> dict:
    """Prefix cache counters: admissions looked up, admissions that reused cached tokens, tokens reused
    (not recomputed), copy-on-write page copies, pages evicted, pages cached now (in use or evictable)."""
    sch = self.scheduler
    cached = self.allocator.num_cached if self.enable_prefix_caching else 0
    evicted = self.allocator.num_evictions if self.enable_prefix_caching else 0
    return {"queries": sch.prefix_queries, "hits": sch.prefix_hits, "hit_tokens": sch.prefix_hit_tokens,
            "copies": sch.cow_copies, "evictions": evicted, "cached_pages": cached}

  def check_pages(self) -> dict:
    """Checks the page pool and returns {"free", "cached_idle", "in_use"} page counts.

    Always: every page is exactly one of free / cached-and-evictable / in use, and the cache's tables agree.
    Every in-use page's reference count equals the number of unfinished requests holding it. When no request
    is unfinished, every count is 0 (all pages free or merely cached-and-evictable). Raises AssertionError
    naming the page otherwise."""
    self.allocator.check_consistency()
    holders: dict[int, int] = {}
    for r in self.scheduler.running + self.scheduler.waiting:
      for p in r.pages:
        holders[p] = holders.get(p, 0) + 1
    for p in self.scheduler._pinned:
      holders[p] = holders.get(p, 0) + 1
    for p in range(self.num_pages):
      count = self.allocator.refcount(p)
      assert count == holders.get(p, 0), f"page {p}: reference count {count}, held by {holders.get(p, 0)}"
    in_use = sum(1 for p in range(self.num_pages) if self.allocator.refcount(p) > 0)
    cached_idle = self.allocator.num_evictable if self.enable_prefix_caching else 0
    if not self.has_unfinished():
      assert in_use == 0, f"{in_use} pages still referenced with no request unfinished"
    return {"free": self.allocator.num_free - cached_idle, "cached_idle": cached_idle, "in_use": in_use}

  def reset_prefix_cache(self) -> int:
    """Forgets every cached page nobody uses (they become plain free pages); returns how many."""
    return self.allocator.reset_cache() if self.enable_prefix_caching else 0

  @property
  def compilations(self) -> int:
    """Step programs compiled since this engine was created (the jit cache is shared between engines)."""
    return step_lib.compilation_count() - self._compilations_at_start

  def has_unfinished(self) -> bool:
    return self.scheduler.has_unfinished()

  @property
  def num_waiting(self) -> int:
    return len(self.scheduler.waiting)

  @property
  def num_running(self) -> int:
    return len(self.scheduler.running)

  def finish_reason(self, request_id: int) -> str | None:
    """'stop', 'length' or 'cancelled' once finished; None while it is waiting or running."""
    if request_id in self._finish_reasons:
      return self._finish_reasons[request_id]
    if request_id in self._requests:
      return None
    raise UnknownRequestError(f"request {request_id!r} is unknown to this engine")

  # ------------------------------------------------------------------ requests
  def _check_request(self, prompt_ids, sampling, max_new_tokens, stop_token_ids, name="prompt"):
    """Validates one request; returns (prompt list, sampling, max_new_tokens, stop set) or raises RequestRejected."""
    try:
      ids = np.asarray(prompt_ids)
    except Exception as e:  # ragged nested lists and the like
      raise RequestRejected(f"{name}: not a sequence of token ids ({e})") from None
    if ids.ndim != 1 or ids.size == 0:
      raise RequestRejected(f"{name}: must be a non-empty 1-D sequence of token ids, got shape {ids.shape}")
    if not np.issubdtype(ids.dtype, np.integer):
      raise RequestRejected(f"{name}: token ids must be integers, got dtype {ids.dtype}")
    vocab = self.config.vocab_size
    bad = ids[(ids < 0) | (ids >= vocab)]
    if bad.size:
      raise RequestRejected(f"{name}: token id {int(bad[0])} is outside the vocabulary [0, {vocab})")
    n = int(ids.size)
    if n >= self.max_model_len:
      raise RequestRejected(f"{name}: length {n} leaves no room to generate: the maximum context (max_model_len) "
                            f"is {self.max_model_len} tokens")
    if max_new_tokens is None:  # as many as the context and the pool allow
      max_new_tokens = max(1, min(self.max_model_len, self.num_pages * self.page_size) - n)
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, (int, np.integer)) or max_new_tokens < 1:
      raise RequestRejected(f"{name}: max_new_tokens must be a positive integer, got {max_new_tokens!r}")
    if n + max_new_tokens > self.max_model_len:
      raise RequestRejected(f"{name}: length {n} + max_new_tokens {max_new_tokens} = {n + max_new_tokens} exceeds "
                            f"the maximum context (max_model_len) of {self.max_model_len} tokens")
    pages = self.scheduler.pages_for(n + max_new_tokens)
    if pages > self.num_pages:
      raise RequestRejected(f"{name}: {n} + {max_new_tokens} tokens need {pages} pages of {self.page_size}, but the "
                            f"pool only has num_pages={self.num_pages}: it could never fit")
    sampling = SamplingParams() if sampling is None else sampling
    if not isinstance(sampling, SamplingParams):
      raise RequestRejected(f"{name}: sampling must be a SamplingParams, got {type(sampling).__name__}")
    if not 0 <= sampling.seed < 2**32:
      raise RequestRejected(f"{name}: sampling.seed must be in [0, 2**32), got {sampling.seed}")
    stops = frozenset(int(t) for t in stop_token_ids)
    bad_stops = sorted(t for t in stops if not 0 <= t < vocab)
    if bad_stops:
      raise RequestRejected(f"{name}: stop token id {bad_stops[0]} is outside the vocabulary [0, {vocab})")
    return [int(t) for t in ids.tolist()], sampling, int(max_new_tokens), stops

  def add_request(self, prompt_ids: Sequence[int], sampling: SamplingParams | None = None,
                  max_new_tokens: int | None = None, stop_token_ids: Sequence[int] = ()) -> int:
    """Queues a request and returns its id. max_new_tokens=None: up to max_model_len (or the pool) in all.

    Raises RequestRejected (a ValueError naming the input and the limit) for a prompt that is empty, too long
    for max_model_len, holds a token outside the vocabulary or could never fit in the page pool, and
    QueueFullError when max_queue new requests are already waiting. A rejected request leaves no trace."""
    checked = self._check_request(prompt_ids, sampling, max_new_tokens, stop_token_ids)
    return self._enqueue(*checked)

  def _enqueue(self, prompt, sampling, max_new_tokens, stops) -> int:
    waiting = self.scheduler.num_new_waiting()
    if waiting >= self.max_queue:
      raise QueueFullError(f"queue full: {waiting} requests already wait for admission (max_queue={self.max_queue});"
                           " step the engine and retry")
    request_id = self._next_id
    self._next_id += 1
    request = Request(request_id=request_id, prompt=prompt, sampling=sampling, max_new_tokens=max_new_tokens,
                      stop_token_ids=stops, arrival=request_id)
    self._requests[request_id] = request
    self.scheduler.add(request)
    return request_id

  def cancel(self, request_id: int) -> bool:
    """Cancels a waiting or running request: its pages are freed now and the next step() reports it
    finished with finish_reason 'cancelled'. Returns True.

    A request that already finished is left alone and False is returned (documented no-op: its outcome
    stands, see finish_reason()). An id this engine never issued raises UnknownRequestError."""
    request = self._requests.get(request_id)
    if request is None:
      if request_id in self._finish_reasons:
        log.info("engine: cancel(%s) ignored: already finished (%s)", request_id, self._finish_reasons[request_id])
        return False
      raise UnknownRequestError(f"cancel: request {request_id!r} is unknown to this engine")
    self._finish(request, CANCELLED)
    self._pending_outputs.append(RequestOutput(request_id, [], True, CANCELLED,
                                               [] if request.sampling.logprobs else None))
    return True

  def _finish(self, request: Request, reason: str) -> None:
    self.scheduler.release(request)
    request.finish_reason = reason
    del self._requests[request.request_id]
    self._finish_reasons[request.request_id] = reason

  # ------------------------------------------------------------------ one step
  def step(self) -> list[RequestOutput]:
    """Schedules and runs one step. Returns one RequestOutput per request that produced a token (or was
    cancelled since the last step); empty when there was nothing to do."""
    outputs, self._pending_outputs = self._pending_outputs, []
    schedule = self.scheduler.schedule()
    self.stats["preemptions"] += len(schedule.preempted)
    for r in schedule.preempted:
      log.debug("engine: preempted request %d (%d tokens to recompute)", r.request_id, r.num_tokens)
    seqs = schedule.seqs
    if not seqs:
      self.scheduler.release_copy_sources()
      return outputs
    num_tokens = schedule.num_tokens
    t_pad = step_lib.pick_bucket(num_tokens, self.token_buckets)
    s_pad = step_lib.pick_bucket(len(seqs), self.seq_buckets)
    g_pad = step_lib.pick_bucket(len(schedule.groups), self.group_buckets) if schedule.groups else 0
    if (t_pad, s_pad, g_pad) not in self._shapes_seen:
      self._shapes_seen.add((t_pad, s_pad, g_pad))
      if self.separate_compile:
        start = time.perf_counter()
        self._run_empty(t_pad, s_pad, g_pad)
        self.stats["compile_seconds"] += time.perf_counter() - start
    batch = self._empty_batch(t_pad, s_pad, g_pad)
    offset = 0
    for i, s in enumerate(seqs):
      r, n = s.request, s.num_tokens
      batch["tokens"][offset:offset + n] = r.token_slice(s.start, s.start + n)
      batch["positions"][offset:offset + n] = np.arange(s.start, s.start + n)
      offset += n
      batch["cu_q_lens"][i + 1] = offset
      batch["kv_lens"][i] = s.start + n
      batch["page_table"][i, :len(r.pages)] = r.pages
      sp = r.sampling
      batch["temperature"][i], batch["top_k"][i], batch["top_p"][i] = sp.temperature, sp.top_k, sp.top_p
      batch["min_p"][i], batch["seeds"][i] = sp.min_p, sp.seed
    batch["cu_q_lens"][len(seqs) + 1:] = offset
    batch["num_seqs"] = np.int32(len(seqs))
    for g, group in enumerate(schedule.groups):
      members = range(group.first, group.first + group.num_seqs)
      prefix = group.num_pages * self.page_size
      batch["group_table"][g, :group.num_pages] = seqs[group.first].request.pages[:group.num_pages]
      batch["group_lens"][g] = prefix
      batch["group_rows"][g, :group.num_seqs] = batch["cu_q_lens"][group.first:group.first + group.num_seqs]
      batch["seq_prefix_lens"][members.start:members.stop] = prefix
      self.stats["shared_prefix_groups"] += 1
      self.stats["shared_prefix_seqs"] += group.num_seqs
      self.stats["shared_prefix_tokens_saved"] += (group.num_seqs - 1) * prefix
    if schedule.copies:
      self._copy_pages(schedule.copies)
    self.scheduler.release_copy_sources()
    tokens, logprobs, self._k_pages, self._v_pages = step_lib.engine_step(
        self._graphdef, self._state, self._k_pages, self._v_pages, batch, attention_impl=self.attention_impl,
        prefix_impl=self.shared_prefix_impl, interpret=self.interpret)
    tokens, logprobs = np.asarray(tokens), np.asarray(logprobs)
    self.stats["steps"] += 1
    self.stats["scheduled_tokens"] += num_tokens
    self.stats["padded_tokens"] += t_pad
    self.stats["max_step_seqs"] = max(self.stats["max_step_seqs"], len(seqs))

    for i, s in enumerate(seqs):
      r = s.request
      samples = s.samples
      r.num_computed = s.start + s.num_tokens
      if not samples:
        self.stats["partial_prefills"] += 1
        continue
      token = int(tokens[i])
      r.output.append(token)
      r.logprobs.append(float(logprobs[i]))
      self.stats["generated_tokens"] += 1
      reason = STOP if token in r.stop_token_ids else LENGTH if len(r.output) >= r.max_new_tokens else None
      if reason is not None:
        self._finish(r, reason)
      outputs.append(RequestOutput(r.request_id, [token], reason is not None, reason,
                                   [r.logprobs[-1]] if r.sampling.logprobs else None))
    return outputs

  def _copy_pages(self, copies: list[tuple[int, int]]) -> None:
    """Copy-on-write: copies page src into page dst in every layer's pools (one small jitted program)."""
    n = step_lib.pick_bucket(len(copies), self.copy_buckets)
    src = np.zeros((n,), np.int32)
    dst = np.full((n,), self.num_pages, np.int32)  # padding: out of the pool, dropped
    src[:len(copies)], dst[:len(copies)] = zip(*copies)
    self._k_pages, self._v_pages = step_lib.copy_pages(self._k_pages, self._v_pages, src, dst)

  def _empty_batch(self, t_pad: int, s_pad: int, g_pad: int = 0) -> dict:
    groups = {} if not g_pad else {
        "group_rows": np.full((g_pad, s_pad), t_pad, np.int32),  # padding members: row t_pad, dropped
        "group_table": np.zeros((g_pad, self.pages_per_seq), np.int32),
        "group_lens": np.zeros((g_pad,), np.int32),
        "seq_prefix_lens": np.zeros((s_pad,), np.int32),
    }
    return groups | {
        "tokens": np.zeros((t_pad,), np.int32),
        "positions": np.zeros((t_pad,), np.int32),
        "cu_q_lens": np.zeros((s_pad + 1,), np.int32),
        "kv_lens": np.zeros((s_pad,), np.int32),
        "page_table": np.zeros((s_pad, self.pages_per_seq), np.int32),
        "num_seqs": np.int32(0),
        "temperature": np.zeros((s_pad,), np.float32),
        "top_k": np.zeros((s_pad,), np.int32),
        "top_p": np.ones((s_pad,), np.float32),
        "min_p": np.zeros((s_pad,), np.float32),
        "seeds": np.zeros((s_pad,), np.uint32),
    }

  def warmup(self) -> int:
    """Compiles every (token bucket, sequence bucket) program ahead of time with empty steps (num_seqs=0:
    nothing is written, nothing sampled is used). Returns how many programs were new."""
    before = step_lib.compilation_count()
    for t_pad in self.token_buckets:
      for s_pad in self.seq_buckets:
        for g_pad in self.group_buckets:
          self._run_empty(t_pad, s_pad, g_pad)
    return step_lib.compilation_count() - before

  def _run_empty(self, t_pad: int, s_pad: int, g_pad: int = 0) -> None:
    tokens, _, self._k_pages, self._v_pages = step_lib.engine_step(
        self._graphdef, self._state, self._k_pages, self._v_pages, self._empty_batch(t_pad, s_pad, g_pad),
        attention_impl=self.attention_impl, prefix_impl=self.shared_prefix_impl, interpret=self.interpret)
    tokens.block_until_ready()

  # ------------------------------------------------------------------ drivers
  def stream(self) -> Iterator[RequestOutput]:
    """Steps until every request has finished, yielding each RequestOutput as it is produced. Requests may be
    added or cancelled between items."""
    while self.has_unfinished() or self._pending_outputs:
      yield from self._checked_step()

  def _checked_step(self) -> list[RequestOutput]:
    """step(), raising instead of spinning if requests are left but nothing could be scheduled (the
    admission checks rule this out; this only guards drivers against an endless loop)."""
    steps = self.stats["steps"]
    outputs = self.step()
    if not outputs and self.stats["steps"] == steps and self.has_unfinished():
      raise RuntimeError(f"engine stalled: {self.num_waiting} waiting, {self.num_running} running, "
                         f"{self.allocator.num_free}/{self.num_pages} pages free")
    return outputs

  def run(self, prompts: Sequence[Sequence[int]], sampling: SamplingParams | Sequence[SamplingParams] | None = None,
          max_new_tokens: int | None = None, stop_token_ids: Sequence[int] = (), progress: bool = True
          ) -> list[list[int]]:
    """Generates for every prompt and returns the new tokens in prompt order (a stop token ends a request and
    is included). One SamplingParams for all prompts gives prompt i the seed sampling.seed + i, as
    jaxinfer.generate does; a list gives each its own. Every prompt is validated before any is queued; more
    prompts than max_queue are fed in as the queue drains. Outputs of requests added by others meanwhile are
    kept and returned by the next step()."""
    from tqdm.auto import tqdm

    if not isinstance(prompts, (list, tuple)) or not prompts:
      raise RequestRejected("prompts must be a non-empty list of token-id lists")
    if sampling is None or isinstance(sampling, SamplingParams):
      base = sampling or SamplingParams()
      samplings = [_with_seed(base, base.seed + i) for i in range(len(prompts))]
    else:
      samplings = list(sampling)
      if len(samplings) != len(prompts):
        raise RequestRejected(f"run: {len(samplings)} SamplingParams for {len(prompts)} prompts")
    checked = [self._check_request(p, s, max_new_tokens, stop_token_ids, name=f"prompt {i}")
               for i, (p, s) in enumerate(zip(prompts, samplings))]
    results: list[list[int]] = [[] for _ in prompts]
    index_of: dict[int, int] = {}
    others: list[RequestOutput] = []
    next_prompt, done = 0, 0
    with tqdm(total=len(prompts), desc="requests", unit="req", disable=not progress, leave=False) as bar:
      while done < len(prompts):
        while next_prompt < len(prompts) and self.scheduler.num_new_waiting() < self.max_queue:
          index_of[self._enqueue(*checked[next_prompt])] = next_prompt
          next_prompt += 1
        outs = self._checked_step()
        for out in outs:
          i = index_of.get(out.request_id)
          if i is None:
            others.append(out)
            continue
          results[i].extend(out.new_token_ids)
          if out.finished:
            done += 1
            bar.update(1)
    self._pending_outputs = others + self._pending_outputs
    return results


def _with_seed(sampling: SamplingParams, seed: int) -> SamplingParams:
  import dataclasses

  return dataclasses.replace(sampling, seed=seed)
