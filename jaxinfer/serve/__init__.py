"""`jaxinfer serve`: an OpenAI-compatible HTTP server on jaxinfer.Engine (see docs/serving.md).

One job per module:
  config.py        ServeConfig, the `serve` section (checkpoint, host, port, ...)
  model_source.py  what is served: a checkpoint, the quickstart export, or a small random byte-level model
  bridge.py        the engine on its own thread: commands in, per-request asyncio queues out
  generation.py    one choice of one request: engine tokens -> text deltas (detokenizer + stop strings)
  detokenizer.py   incremental detokenization that never emits half a UTF-8 character
  stop.py          stop strings matched across token boundaries, trimmed from the output
  chat_template.py chat templates rendered as transformers' apply_chat_template renders them
  protocol.py      the request bodies (pydantic), validated with errors naming the field
  sampling.py      request fields -> engine requests (prompt ids, SamplingParams, limits)
  responses.py     OpenAI response objects and server-sent-event chunks
  errors.py        the OpenAI error JSON and the exception handlers
  metrics.py       Prometheus metrics with vLLM's names under a `jaxinfer:` prefix
  routes.py        the FastAPI app: endpoints
  server.py        uvicorn on a host/port, SIGTERM drains, a background-thread server for tests
  loadgen.py       the HTTP load generator of `jaxinfer bench serve`; bench_metrics.py its statistics
"""
