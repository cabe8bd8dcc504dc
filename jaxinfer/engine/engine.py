"""jaxinfer.Engine: continuous batching over a paged KV cache, with chunked prefill and preemption, optionally
prefix caching, shared-prefix (Hydragen) attention and speculative verification; a thin coordinator.

  engine = jaxinfer.Engine(model, jaxinfer.EngineConfig(max_batch_size=16, page_size=16, num_pages=256))
  engine = jaxinfer.Engine(model, max_batch_size=16, page_size=16)   # the same, as keyword overrides
  rid = engine.add_request(prompt_ids, sampling=SamplingParams(temperature=0.8, seed=1), max_new_tokens=64)
  while engine.has_unfinished():
    for out in engine.step():           # RequestOutput(request_id, new_token_ids, finished, finish_reason, logprobs)
      ...
  engine.run(prompts, sampling, max_new_tokens)   # -> new-token lists in prompt order
  for out in engine.stream(): ...                  # every output until the engine is idle

One step goes Scheduler (which requests, how many tokens; pages) -> BatchBuilder (a typed StepBatch, padded
to buckets; slot mapping; page-table updates) -> ModelRunner (one jitted step on the device) ->
OutputProcessor (verification, stop conditions, logprobs, outputs). With async scheduling (run() and stream())
step N+1 is scheduled and dispatched before the results of step N are processed; step() is synchronous.
"""

from __future__ import annotations

import logging
import time
from typing import Iterator, Sequence

from jaxinfer.engine import step as step_lib
from jaxinfer.engine.allocator import PageAllocator
from jaxinfer.engine.kv_policies.budget import policy_budget
from jaxinfer.engine.kv_policies.registry import make_policy
from jaxinfer.engine.batch import BatchBuilder
from jaxinfer.engine.config import EngineConfig
from jaxinfer.engine.output import OutputProcessor
from jaxinfer.engine.prefix_cache import PrefixCachingAllocator
from jaxinfer.engine.request import (CANCELLED, QueueFullError, Request, RequestOutput, RequestRejected,
                                     UnknownRequestError)
from jaxinfer.engine.runner import ModelRunner
from jaxinfer.engine.scheduler import Scheduler
from jaxinfer.engine.validate import check_request
from jaxinfer.generation.sampling import SamplingParams

log = logging.getLogger("jaxinfer.engine")


class Engine:
  """Serves many requests at once on one model.

  Args:
    model: a jaxinfer Transformer. It is split once (nnx.split); later changes to it are not seen.
    config: an EngineConfig (or an ml-collections `engine` section); None: the defaults.
    proposer: a speculative Proposer (jaxinfer/engine/speculative.py) whose draft tokens each decode verifies;
      needs config.max_rows_per_seq > 1. Steps with a proposer run synchronously.
    **overrides: EngineConfig fields (max_batch_size=..., page_size=..., ...), applied over `config`.
  """

  def __init__(self, model, config: EngineConfig | None = None, *, proposer=None, **overrides):
    cfg = model.config
    self.config = cfg  # the model's config
    self.engine_config = policy_budget(EngineConfig.from_kwargs(config, **overrides), cfg).resolve(cfg)
    ec = self.engine_config
    self.probs_for = None  # seq -> bool: steps holding such a sequence also return row distributions
    self.row_head = None  # step.RowHead run on every step's sampled rows (Medusa heads)
    self.tree_verification = False  # drafts may form candidate trees (tree attention in every step)
    if ec.speculative is not None:  # a speculative method from the config (jaxinfer/engine/speculative/)
      from jaxinfer.engine.speculative.setup import configure

      self.engine_config, proposer = configure(self, model, ec, proposer)
      ec = self.engine_config
    self.pages_per_seq = -(-ec.max_model_len // ec.page_size)
    self.kv_policy = make_policy(ec.kv_policy, cfg, ec)  # None: every token keeps its slot
    if self.kv_policy is not None:
      self.pages_per_seq = self.kv_policy.table_pages(self.pages_per_seq)
    # a KV policy's narrower table for steps whose sequences all fit (a second width of every step program)
    narrow = None if self.kv_policy is None else self.kv_policy.decode_table_pages(self.pages_per_seq)
    self.builder = BatchBuilder(max_batch_size=ec.max_batch_size, max_step_tokens=ec.max_step_tokens,
                                page_size=ec.page_size, pages_per_seq=self.pages_per_seq, num_pages=ec.num_pages,
                                min_token_bucket=ec.min_token_bucket, min_seq_bucket=ec.min_seq_bucket,
                                max_rows_per_seq=ec.max_rows_per_seq, max_prefix_groups=ec.max_prefix_groups,
                                shared_prefix_attention=ec.enable_shared_prefix_attention, policy=self.kv_policy,
                                tree_verification=self.tree_verification, narrow_pages=narrow)
    self.runner = ModelRunner(model, ec, max_rows=self.builder.max_rows, pages_per_seq=self.pages_per_seq,
                              kv_policy=self.kv_policy, row_head=self.row_head, tree_pad=self.builder.tree_pad)
    self.allocator = (PrefixCachingAllocator(ec.num_pages) if ec.enable_prefix_caching
                      else PageAllocator(ec.num_pages))
    self.scheduler = Scheduler(self.allocator, page_size=ec.page_size, max_batch_size=ec.max_batch_size,
                               max_step_tokens=ec.max_step_tokens, chunked_prefill=ec.chunked_prefill,
                               prefix_caching=ec.enable_prefix_caching,
                               group_prefixes=ec.enable_shared_prefix_attention,
                               max_prefix_groups=ec.max_prefix_groups,
                               min_shared_prefix_pages=ec.min_shared_prefix_pages, proposer=proposer,
                               max_rows_per_seq=ec.max_rows_per_seq, max_model_len=ec.max_model_len,
                               kv_policy=self.kv_policy)
    if self.kv_policy is not None:
      self.kv_policy.bind(self.runner, self.allocator, self.builder)
    self._requests: dict[int, Request] = {}  # unfinished
    self._finish_reasons: dict[int, str] = {}  # finished: id -> reason
    self._pending_outputs: list[RequestOutput] = []  # returned by the next step()
    self._inflight = None  # async scheduling: the dispatched step whose results are not processed yet
    self._prev_rows: dict[int, int] = {}  # request id -> its newest token's row in the last step's samples
    self._next_id = 0
    self._compilations_at_start = step_lib.compilation_count()
    # steps run; requests preempted; tokens run through the model (real / padded); tokens sampled; prefill
    # chunks that ended before their prompt did (chunked prefill at work); most sequences in one step
    # prefix caching (see prefix_stats): page copies made; shared-prefix attention: groups run (summed over
    # steps), decode rows served through a group, prefix keys those rows did not each read again; speculative:
    # draft tokens verified and accepted; host seconds spent scheduling + building + processing
    self.stats = {"steps": 0, "preemptions": 0, "scheduled_tokens": 0, "padded_tokens": 0, "generated_tokens": 0,
                  "partial_prefills": 0, "max_step_seqs": 0, "compile_seconds": 0.0, "shared_prefix_groups": 0,
                  "shared_prefix_seqs": 0, "shared_prefix_tokens_saved": 0, "host_seconds": 0.0,
                  "spec_draft_tokens": 0, "spec_accepted_tokens": 0, "spec_verify_steps": 0,
                  "narrow_table_steps": 0}  # steps run on the narrow page table (KV policy decode_table_pages)
    self.processor = OutputProcessor(self.scheduler, self.stats, self._finish, self.builder.policy.slot_mapping)
    log.info("engine: %d pages x %d tokens (%d layers), max_batch_size=%d, max_step_tokens=%d, max_model_len=%d, "
             "chunked_prefill=%s, prefix caching %s, shared-prefix attention %s, async scheduling %s; token "
             "buckets %s (decode-only steps: %s), sequence buckets %s", ec.num_pages, ec.page_size, cfg.num_layers,
             ec.max_batch_size, ec.max_step_tokens, ec.max_model_len, ec.chunked_prefill, ec.enable_prefix_caching,
             ec.enable_shared_prefix_attention, ec.async_scheduling, self.token_buckets,
             "sequence bucket" if self.builder.decode_buckets else "token buckets", self.seq_buckets)

  # ------------------------------------------------------------------ config views
  def __getattr__(self, name):
    # engine.page_size, engine.max_batch_size, ...: the resolved EngineConfig's fields
    if name != "engine_config" and "engine_config" in self.__dict__ and hasattr(self.engine_config, name):
      return getattr(self.engine_config, name)
    raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

  @property
  def token_buckets(self) -> tuple[int, ...]:
    return self.builder.token_buckets

  @property
  def seq_buckets(self) -> tuple[int, ...]:
    return self.builder.seq_buckets

  @property
  def group_buckets(self) -> tuple[int, ...]:
    return self.builder.group_buckets

  # ------------------------------------------------------------------ introspection
  @property
  def max_programs(self) -> int:
    """Upper bound on the step programs this engine can compile (page-copy and page-table-update programs
    not included: at most len(runner.copy_buckets) and len(runner.update_buckets) more)."""
    return self.builder.max_programs

  @property
  def prefix_stats(self) -> dict:
    """Prefix cache counters: admissions looked up, admissions that reused cached tokens, tokens reused
    (not recomputed), copy-on-write page copies, pages evicted, pages cached now (in use or evictable)."""
    sch = self.scheduler
    caching = self.engine_config.enable_prefix_caching
    return {"queries": sch.prefix_queries, "hits": sch.prefix_hits, "hit_tokens": sch.prefix_hit_tokens,
            "copies": sch.cow_copies, "evictions": self.allocator.num_evictions if caching else 0,
            "cached_pages": self.allocator.num_cached if caching else 0}

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
    cached_idle = self.allocator.num_evictable if self.engine_config.enable_prefix_caching else 0
    if not self.has_unfinished():
      assert in_use == 0, f"{in_use} pages still referenced with no request unfinished"
    return {"free": self.allocator.num_free - cached_idle, "cached_idle": cached_idle, "in_use": in_use}

  def reset_prefix_cache(self) -> int:
    """Forgets every cached page nobody uses (they become plain free pages); returns how many."""
    return self.allocator.reset_cache() if self.engine_config.enable_prefix_caching else 0

  @property
  def compilations(self) -> int:
    """Step programs compiled since this engine was created (engines of the same model share programs)."""
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
    ec = self.engine_config
    return check_request(prompt_ids, sampling, max_new_tokens, stop_token_ids, vocab=self.config.vocab_size,
                         max_model_len=ec.max_model_len, num_pages=ec.num_pages, page_size=ec.page_size, name=name,
                         pages_needed=None if self.kv_policy is None else self.kv_policy.pages_for_request)

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

  def rollback(self, request_id: int, num_tokens: int) -> int:
    """Discards the last num_tokens generated tokens of an unfinished request (speculative methods, or a
    client editing a reply); its pages beyond the kept tokens go back to the pool. Returns how many pages.
    The request then generates again from its kept tokens (max_new_tokens counts the kept ones only)."""
    request = self._requests.get(request_id)
    if request is None:
      raise UnknownRequestError(f"rollback: request {request_id!r} is unknown to this engine or finished")
    self._drain()
    if request_id not in self._requests:  # finished by the step just processed
      raise UnknownRequestError(f"rollback: request {request_id!r} finished ({self._finish_reasons[request_id]})")
    try:
      return len(self.scheduler.rollback(request, num_tokens))
    except ValueError as e:
      raise RequestRejected(f"rollback: request {request_id}: {e}") from None

  def preempt(self, request_id: int) -> None:
    """Preempts a running request now, as the scheduler does when pages run out: its pages go back and it is
    recomputed from its prompt and generated tokens when admitted again (tests and KV policies use this)."""
    request = self._requests.get(request_id)
    if request is None:
      raise UnknownRequestError(f"preempt: request {request_id!r} is unknown to this engine or finished")
    self.scheduler.preempt(request)
    self.builder.release(request)
    self.stats["preemptions"] += 1

  def _finish(self, request: Request, reason: str) -> None:
    self.scheduler.release(request)
    self.builder.release(request)
    request.finish_reason = reason
    del self._requests[request.request_id]
    self._finish_reasons[request.request_id] = reason

  # ------------------------------------------------------------------ one step
  def _launch(self):
    """Schedules and dispatches one step (not waiting for it); returns its InFlight or None if nothing ran."""
    start = time.perf_counter()
    schedule = self.scheduler.schedule()
    self.stats["preemptions"] += len(schedule.preempted)
    for r in schedule.preempted:
      self.builder.release(r)
      log.debug("engine: preempted request %d (%d tokens to recompute)", r.request_id, r.num_tokens)
    seqs = schedule.seqs
    if not seqs:
      self.scheduler.release_copy_sources()
      self.stats["host_seconds"] += time.perf_counter() - start
      return None
    built = self.builder.build(schedule, self._prev_rows)
    compile_before = self.runner.compile_seconds
    self.runner.maybe_compile_apart(built.shape, built.table_pages, built.decode_only)
    self.stats["compile_seconds"] = self.runner.compile_seconds
    want_logprobs = any(s.num_samples and s.request.sampling.logprobs for s in seqs)
    ps = self.page_size
    for group in schedule.groups:
      self.stats["shared_prefix_groups"] += 1
      self.stats["shared_prefix_seqs"] += group.num_seqs
      self.stats["shared_prefix_tokens_saved"] += (group.num_seqs - 1) * group.num_pages * ps
    dispatch_start = time.perf_counter()
    want_probs = self.probs_for is not None and any(s.num_samples and self.probs_for(s) for s in seqs)
    inflight = self.runner.dispatch(built, schedule.copies, want_logprobs, want_probs)
    dispatch_seconds = time.perf_counter() - dispatch_start  # device work handed over (compiles on a new shape)
    self.scheduler.release_copy_sources()
    self.scheduler.dispatched(schedule)  # as if the step had run: the next schedule follows it
    if self.kv_policy is not None:
      self.kv_policy.after_dispatch(schedule)  # evictions / compaction, before the next schedule
    self._prev_rows = {s.request.request_id: row + k - 1 for s, (row, k) in zip(seqs, built.sample_rows) if k}
    self.stats["steps"] += 1
    self.stats["narrow_table_steps"] += built.table_pages != self.pages_per_seq
    self.stats["scheduled_tokens"] += built.num_tokens
    self.stats["padded_tokens"] += built.shape[0]
    self.stats["max_step_seqs"] = max(self.stats["max_step_seqs"], len(seqs))
    self.stats["host_seconds"] += (time.perf_counter() - start - dispatch_seconds
                                   - (self.runner.compile_seconds - compile_before))
    return inflight

  def _process(self, inflight) -> list[RequestOutput]:
    tokens, logprobs = inflight.fetch()
    start = time.perf_counter()
    outputs = self.processor.process(inflight.built, tokens, logprobs, inflight.fetch_probs(), inflight.fetch_head())
    moves = self.processor.take_moves()
    if moves:  # accepted tree paths: their k/v to their positions, before any later step reads them
      self.runner.move_slots(moves)
    self.stats["host_seconds"] += time.perf_counter() - start
    return outputs

  def _drain(self) -> None:
    """Processes the step still running (async scheduling), keeping its outputs for the next step()."""
    if self._inflight is not None:
      inflight, self._inflight = self._inflight, None
      self._pending_outputs += self._process(inflight)
      self._prev_rows = {}

  def step(self) -> list[RequestOutput]:
    """Schedules and runs one step and returns its outputs: one RequestOutput per request that produced
    tokens (or was cancelled since the last step); empty when there was nothing to do. Synchronous."""
    self._drain()
    outputs, self._pending_outputs = self._pending_outputs, []
    inflight = self._launch()
    if inflight is not None:
      outputs += self._process(inflight)
    self._prev_rows = {}
    return outputs

  def _async_step(self) -> list[RequestOutput]:
    """Dispatches step N+1, then processes step N (which ran meanwhile); returns step N's outputs."""
    if self.scheduler.proposer is not None:  # drafts need the tokens before them
      return self.step()
    outputs, self._pending_outputs = self._pending_outputs, []
    launched = self._launch()
    previous, self._inflight = self._inflight, launched
    if previous is not None:
      outputs += self._process(previous)
    return outputs

  def warmup(self) -> int:
    """Compiles every step shape ahead of time with empty steps (num_seqs=0: nothing is written, nothing
    sampled is used). Returns how many programs were new."""
    self._drain()
    before = step_lib.compilation_count()
    for width in self.builder.table_widths:
      for shape, decode_only in self.builder.all_shapes():
        self.runner.run_empty(shape, width, decode_only)
    return step_lib.compilation_count() - before

  # ------------------------------------------------------------------ drivers
  def stream(self) -> Iterator[RequestOutput]:
    """Steps until every request has finished, yielding each RequestOutput as it is produced (with async
    scheduling, one step after the step that made it). Requests may be added or cancelled between items."""
    while self.has_unfinished() or self._pending_outputs or self._inflight is not None:
      yield from self._checked_step()

  def _checked_step(self) -> list[RequestOutput]:
    """One step of the drivers (async unless switched off), raising instead of spinning if requests are left
    but nothing could be scheduled (the admission checks rule this out; this only guards against a loop)."""
    steps = self.stats["steps"]
    had_inflight = self._inflight is not None
    outputs = self._async_step() if self.engine_config.async_scheduling else self.step()
    if (not outputs and self.stats["steps"] == steps and not had_inflight and self._inflight is None
        and self.has_unfinished()):
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
