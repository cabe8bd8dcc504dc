"""Putting it together: engine + bridge + metrics + app, served by uvicorn.

  serving = create(served, engine_config)       # the engine thread starts; nothing compiles until requests come
  serve_forever(serving, host, port)            # SIGTERM / Ctrl-C: stop accepting, drain, then exit
  with BackgroundServer(serving) as s: s.url    # tests: a free loopback port, a thread of its own

SIGTERM drains: uvicorn stops accepting connections and waits (up to `drain_timeout_s`) for the open ones,
streams included, to finish; then the app's shutdown stops the engine thread (cancelling anything left).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import threading
import time

from jaxinfer.serve.bridge import EngineBridge
from jaxinfer.serve.metrics import ServerMetrics
from jaxinfer.serve.routes import Serving, build_app

log = logging.getLogger("jaxinfer.serve")


def create(served, engine_config, max_queue: int = 256, warmup: bool = False) -> Serving:
  from jaxinfer.engine import Engine

  engine = Engine(served.model, engine_config)
  if warmup:
    start = time.perf_counter()
    count = engine.warmup()
    log.info("serve: compiled %d step programs in %.1fs", count, time.perf_counter() - start)
  bridge = EngineBridge(engine, max_queue=max_queue)
  metrics = ServerMetrics(served.name, bridge.snapshot)
  bridge.metrics = metrics
  bridge.start()
  return Serving(served, bridge, engine.engine_config, metrics)


def app_for(serving: Serving, stop_bridge: bool = True):
  @contextlib.asynccontextmanager
  async def lifespan(_app):
    yield
    if stop_bridge:  # uvicorn has closed every connection (drained) or hit drain_timeout_s
      log.info("serve: connections drained; stopping the engine (%d requests left)", serving.bridge.num_unfinished)
      serving.bridge.stop()

  return build_app(serving, lifespan=lifespan)


def _config(app, drain_timeout_s: float, **kwargs):
  import uvicorn

  return uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=int(max(1, drain_timeout_s)),
                        access_log=False, **kwargs)


def serve_forever(serving: Serving, host: str, port: int, drain_timeout_s: float = 600.0) -> None:
  import uvicorn

  server = uvicorn.Server(_config(app_for(serving), drain_timeout_s, host=host, port=port))
  log.info("serve: listening on http://%s:%d/v1 (model %r); SIGTERM drains running requests, then exits",
           host, port, serving.served.name)
  server.run()  # after a SIGTERM, uvicorn re-raises it once drained: the exit status is then 143 (-15)


class BackgroundServer:
  """The app on a free loopback port, in a thread (tests, the bench smoke test). `stop()` does what SIGTERM
  does: stop accepting, drain open requests, shut down."""

  def __init__(self, serving: Serving, stop_bridge: bool = False, drain_timeout_s: float = 60.0):
    import uvicorn

    self.serving = serving
    self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    self.sock.bind(("127.0.0.1", 0))
    self.port = self.sock.getsockname()[1]
    self.url = f"http://127.0.0.1:{self.port}"
    self.server = uvicorn.Server(_config(app_for(serving, stop_bridge), drain_timeout_s))
    self.thread = threading.Thread(target=lambda: asyncio.run(self.server.serve(sockets=[self.sock])),
                                   name="jaxinfer-http", daemon=True)

  def start(self, timeout: float = 30.0) -> "BackgroundServer":
    self.thread.start()
    deadline = time.monotonic() + timeout
    while not self.server.started:
      if time.monotonic() > deadline or not self.thread.is_alive():
        raise RuntimeError(f"the test server did not start within {timeout}s")
      time.sleep(0.01)
    return self

  def stop(self, timeout: float = 60.0) -> None:
    self.server.should_exit = True  # what uvicorn's SIGTERM handler sets
    self.thread.join(timeout)

  def __enter__(self):
    return self.start()

  def __exit__(self, *exc):
    self.stop()
