"""The engine on its own thread, behind an asyncio front: commands in (one queue), outputs out (a queue per
request). Only this thread calls the engine (and so JAX); HTTP handlers only enqueue and await.

  bridge = EngineBridge(engine, metrics, max_queue=256); bridge.start()
  handle = await bridge.add(prompt_ids, sampling, max_new_tokens, stop_ids)   # RequestRejected / QueueFullError
  while (out := await handle.queue.get()) ...: RequestOutput items, until out.finished (or an Exception item)
  bridge.cancel(handle)                        # the client left: its pages go back at the next step
  bridge.call(lambda engine: engine.check_pages()).result()   # anything else, run between steps
  bridge.stop()                                # cancels what is left, ends the thread

The thread blocks on the command queue while the engine is idle; while it is busy it runs `engine.stream()`
(async scheduling: step N+1 is dispatched before step N's outputs are handed over) and takes new commands
after every output. After each step it publishes a snapshot (running, waiting, KV usage, prefix-cache counts)
that /metrics and the queue-full check read without touching the engine.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import logging
import queue
import threading
import time

from jaxinfer.engine.request import QueueFullError

log = logging.getLogger("jaxinfer.serve")


@dataclasses.dataclass(eq=False)
class Handle:
  """One engine request as the front sees it."""
  loop: asyncio.AbstractEventLoop
  queue: asyncio.Queue
  prompt_len: int
  arrival: float = dataclasses.field(default_factory=time.monotonic)
  request_id: int | None = None
  cancelled: bool = False
  stopped_by_string: bool = False  # cancelled because a stop string matched: a "stop", not an abort
  num_tokens: int = 0
  first_token_time: float | None = None
  last_token_time: float | None = None


class EngineBridge:
  def __init__(self, engine, metrics=None, max_queue: int = 256):
    self.engine, self.metrics, self.max_queue = engine, metrics, max_queue
    self._inbox: queue.Queue = queue.Queue()
    self._handles: dict[int, Handle] = {}  # engine thread only
    self._pending_adds = 0  # submitted, not yet seen by the engine thread
    self._lock = threading.Lock()
    self._resume = threading.Event()
    self._resume.set()
    self._snapshot: dict = {}
    self._thread: threading.Thread | None = None
    self.error: BaseException | None = None  # the engine failed; the server answers 503 from then on
    self.stopping = False

  # ------------------------------------------------------------------ front (any thread / the event loop)
  def start(self) -> "EngineBridge":
    self._publish()
    self._thread = threading.Thread(target=self._run, name="jaxinfer-engine", daemon=True)
    self._thread.start()
    return self

  def snapshot(self) -> dict:
    return self._snapshot

  @property
  def num_pending_adds(self) -> int:
    """Requests submitted that the engine thread has not taken yet."""
    return self._pending_adds

  @property
  def num_unfinished(self) -> int:
    s = self._snapshot
    return s.get("running", 0) + s.get("waiting", 0) + self._pending_adds

  def check_capacity(self, count: int = 1) -> None:
    """QueueFullError unless `count` more requests fit in the queue (waiting + not yet seen by the engine)."""
    waiting = self._snapshot.get("waiting", 0) + self._pending_adds
    if waiting + count > self.max_queue:
      raise QueueFullError(f"queue full: {waiting} requests wait for admission and this one asks for {count} "
                           f"more (serve.max_queue={self.max_queue}); retry later")

  async def add(self, prompt_ids, sampling, max_new_tokens, stop_ids=()) -> Handle:
    """Queues one request; returns its Handle once the engine accepted it (its checks raise here)."""
    loop = asyncio.get_running_loop()
    handle = Handle(loop, asyncio.Queue(), len(prompt_ids))
    accepted: concurrent.futures.Future = concurrent.futures.Future()
    with self._lock:
      self._pending_adds += 1
    self._inbox.put(("add", (handle, list(prompt_ids), sampling, max_new_tokens, tuple(stop_ids), accepted)))
    try:
      await asyncio.wrap_future(accepted)
    except asyncio.CancelledError:  # the client left before the engine saw the request
      self.cancel(handle)
      raise
    return handle

  def cancel(self, handle: Handle) -> None:
    if not handle.cancelled:
      handle.cancelled = True
      self._inbox.put(("cancel", handle))

  def call(self, fn) -> concurrent.futures.Future:
    """fn(engine) on the engine thread between steps; its result (or exception) in the returned future."""
    future: concurrent.futures.Future = concurrent.futures.Future()
    self._inbox.put(("call", (fn, future)))
    return future

  def pause(self) -> None:
    """Hold the engine thread before its next command or step (tests: fill the queue deterministically)."""
    self._resume.clear()

  def resume(self) -> None:
    self._resume.set()

  def stop(self, timeout: float = 30.0) -> None:
    """Cancels every request left and ends the thread."""
    self.stopping = True
    self._resume.set()
    self._inbox.put(("stop", None))
    if self._thread is not None:
      self._thread.join(timeout)

  # ------------------------------------------------------------------ engine thread
  def _run(self) -> None:
    stop = False
    while not stop:
      stop = self._take(block=True)
      try:
        for out in self.engine.stream():
          self._deliver(out)
          stop = self._take(block=False) or stop
          if stop:
            self._cancel_all()
      except Exception as e:  # noqa: BLE001 - a bug in the engine: fail its requests, keep the server up
        log.exception("serve: engine failed")
        self.error = e
        for handle in list(self._handles.values()):
          self._put(handle, RuntimeError(f"engine failed: {type(e).__name__}: {e}"))
        self._handles.clear()
      self._publish()

  def _take(self, block: bool) -> bool:
    """Runs the queued commands; True when asked to stop."""
    self._resume.wait()
    stop = False
    try:
      command = self._inbox.get(block=block and not self.engine.has_unfinished())
    except queue.Empty:
      return False
    self._resume.wait()  # paused while this thread was blocked waiting for a command
    while True:
      kind, arg = command
      if kind == "add":
        self._add(*arg)
      elif kind == "cancel":
        if arg.request_id is not None and arg.request_id in self._handles:
          self.engine.cancel(arg.request_id)
      elif kind == "call":
        fn, future = arg
        try:
          future.set_result(fn(self.engine))
        except Exception as e:  # noqa: BLE001 - handed to the caller
          future.set_exception(e)
      elif kind == "stop":
        stop = True
      try:
        command = self._inbox.get_nowait()
      except queue.Empty:
        break
    if stop:
      self._cancel_all()
    self._publish()
    return stop

  def _add(self, handle, prompt, sampling, max_new_tokens, stop_ids, accepted) -> None:
    with self._lock:
      self._pending_adds -= 1
    if handle.cancelled or self.stopping:
      accepted.set_exception(QueueFullError("the server is shutting down") if self.stopping
                             else asyncio.CancelledError())
      return
    try:
      handle.request_id = self.engine.add_request(prompt, sampling, max_new_tokens, stop_ids)
    except Exception as e:  # noqa: BLE001 - RequestRejected / QueueFullError: the handler answers 4xx
      accepted.set_exception(e)
      return
    handle.arrival = min(handle.arrival, time.monotonic())
    self._handles[handle.request_id] = handle
    accepted.set_result(handle.request_id)

  def _cancel_all(self) -> None:
    for rid in list(self._handles):
      self.engine.cancel(rid)

  def _deliver(self, out) -> None:
    handle = self._handles.get(out.request_id)
    if handle is None:
      return
    now = time.monotonic()
    m = self.metrics
    if out.new_token_ids:
      if m is not None:
        if handle.first_token_time is None:
          m.ttft.observe(now - handle.arrival)
        else:
          m.itl.observe(now - handle.last_token_time)
        m.generation_tokens.inc(len(out.new_token_ids))
      if handle.first_token_time is None:
        handle.first_token_time = now
      handle.last_token_time = now
      handle.num_tokens += len(out.new_token_ids)
    if out.finished:
      del self._handles[out.request_id]
      if m is not None:
        reason = "stop" if handle.stopped_by_string else ("abort" if out.finish_reason == "cancelled"
                                                          else out.finish_reason)
        m.e2e.observe(now - handle.arrival)
        m.finished(reason, handle.prompt_len)
    self._put(handle, out)
    if self.engine.stats["steps"] != self._snapshot.get("steps"):
      self._publish()

  @staticmethod
  def _put(handle: Handle, item) -> None:
    try:
      handle.loop.call_soon_threadsafe(handle.queue.put_nowait, item)
    except RuntimeError:  # the event loop is gone (server shut down): nobody is listening
      pass

  def _publish(self) -> None:
    e = self.engine
    free = e.allocator.num_free
    prefix = e.prefix_stats
    self._snapshot = {"steps": e.stats["steps"], "running": e.num_running, "waiting": e.num_waiting,
                      "kv_usage": 1.0 - free / e.num_pages, "prefix_queries": prefix["queries"],
                      "prefix_hits": prefix["hits"], "prefix_hit_tokens": prefix["hit_tokens"],
                      "preemptions": e.stats["preemptions"]}
