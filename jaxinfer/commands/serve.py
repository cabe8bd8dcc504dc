"""`jaxinfer serve`: an OpenAI-compatible HTTP server on jaxinfer.Engine (docs/serving.md).

  jaxinfer serve --config experiments/serve.py [--config.serve.checkpoint=DIR] [--config.serve.port=8000]
                 [--config.engine.max_batch_size=16 --config.engine.chunked_prefill=False ...]

Reads the `serve` section (jaxinfer.serve.config.ServeConfig) and the `engine` section (EngineConfig).
"""

from __future__ import annotations

import logging

from jaxinfer.config import from_section, resolve_config_paths
from jaxinfer.engine.config import EngineConfig

log = logging.getLogger("jaxinfer.serve")


def load(config):
  """(ServeConfig, EngineConfig) of a config (its paths were made absolute when it was loaded)."""
  from jaxinfer.serve.config import ServeConfig

  resolve_config_paths(config)  # a no-op after the CLI; for callers that pass a config of their own
  serve = from_section(ServeConfig, config.get("serve", {}), "serve")
  engine = from_section(EngineConfig, config.get("engine", {}), "engine")
  return serve, engine


def run(config):
  logging.getLogger("jax").setLevel(logging.WARNING)
  serve, engine_config = load(config)
  from jaxinfer.serve import model_source, server

  served = model_source.load_served_model(serve, seed=config.get("seed", 0), mesh_section=config.get("mesh"))
  print(f"jaxinfer serve: serving {served.name!r}: {served.describe}", flush=True)
  serving = server.create(served, engine_config, max_queue=serve.max_queue, warmup=serve.warmup)
  ec = serving.engine_config
  print(f"jaxinfer serve: engine max_batch_size={ec.max_batch_size} max_step_tokens={ec.max_step_tokens} "
        f"max_model_len={ec.max_model_len} chunked_prefill={ec.chunked_prefill} pages={ec.num_pages}x{ec.page_size};"
        f" http://{serve.host}:{serve.port}/v1", flush=True)
  server.serve_forever(serving, serve.host, serve.port, serve.drain_timeout_s)
