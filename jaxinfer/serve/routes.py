"""The FastAPI app: /v1/completions, /v1/chat/completions, /v1/models, /health, /metrics, /tokenize,
/detokenize. Handlers tokenize, check and enqueue; they never touch the engine (bridge.py does)."""

from __future__ import annotations

import asyncio
import dataclasses
import time

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from jaxinfer.engine.request import QueueFullError, RequestRejected
from jaxinfer.serve import chat_template, errors, sampling
from jaxinfer.serve.errors import APIError, bad_request
from jaxinfer.serve.generation import Choice, deltas
from jaxinfer.serve.protocol import (ChatCompletionRequest, CompletionRequest, DetokenizeRequest,
                                     TokenizeRequest)
from jaxinfer.serve.responses import Renderer, sse, sse_done, usage


@dataclasses.dataclass
class Serving:
  served: object  # model_source.ServedModel
  bridge: object  # bridge.EngineBridge
  engine_config: object  # the engine's resolved EngineConfig
  metrics: object  # metrics.ServerMetrics

  @property
  def tokenizer(self):
    return self.served.tokenizer


def encode(tokenizer, text: str, add_special_tokens: bool = True) -> list[int]:
  inner = getattr(tokenizer, "tokenizer", None)  # jaxinfer.tokenizer.HFTokenizer wraps a tokenizers.Tokenizer
  if inner is not None:
    return inner.encode(text, add_special_tokens=add_special_tokens).ids
  return tokenizer.encode(text)


def token_text_fn(tokenizer, as_ids: bool):
  if as_ids:
    return lambda t: f"token_id:{t}"
  return lambda t: tokenizer.decode([t])


def build_app(state: Serving, lifespan=None) -> FastAPI:
  app = FastAPI(title="jaxinfer", lifespan=lifespan)
  app.state.serving = state
  errors.install(app)
  served = state.served

  def healthy() -> None:
    if state.bridge.error is not None:
      raise APIError(503, f"the engine failed: {state.bridge.error}")
    if state.bridge.stopping:
      raise APIError(503, "the server is shutting down")

  @app.get("/health")
  async def health():
    healthy()
    return Response(status_code=200)

  @app.get("/metrics")
  async def metrics():
    return Response(state.metrics.exposition(), media_type="text/plain; version=0.0.4; charset=utf-8")

  @app.get("/v1/models")
  async def models():
    return {"object": "list", "data": [{"id": served.name, "object": "model", "created": int(time.time()),
                                        "owned_by": "jaxinfer", "root": served.name,
                                        "max_model_len": state.engine_config.max_model_len}]}

  def render_chat(messages, add_generation_prompt: bool, kwargs=None) -> str:
    if served.chat_template is None:
      raise bad_request(f"messages: the model `{served.name}` has no chat template (none in its "
                        "tokenizer_config.json or chat_template.jinja); use /v1/completions, or start the server "
                        "with --config.serve.chat_template=FILE", "messages")
    plain = [m.model_dump(exclude_none=True) | {"content": m.text()} for m in messages]
    try:
      return chat_template.render(served.chat_template, plain, add_generation_prompt, served.special_tokens,
                                  **(kwargs or {}))
    except chat_template.TemplateError as e:
      raise bad_request(f"messages: {e}", "messages") from None

  @app.post("/tokenize")
  async def tokenize(req: TokenizeRequest):
    sampling.check_model(req.model, served.name)
    if (req.prompt is None) == (req.messages is None):
      raise bad_request("prompt: give exactly one of `prompt` or `messages`", "prompt")
    if req.messages is not None:
      ids = encode(state.tokenizer, render_chat(req.messages, req.add_generation_prompt), False)
    else:
      ids = encode(state.tokenizer, req.prompt, req.add_special_tokens)
    return {"count": len(ids), "max_model_len": state.engine_config.max_model_len, "tokens": ids}

  @app.post("/detokenize")
  async def detokenize(req: DetokenizeRequest):
    sampling.check_model(req.model, served.name)
    bad = [t for t in req.tokens if not 0 <= t < served.vocab_size]
    if bad:
      raise bad_request(f"tokens: token id {bad[0]} is outside the vocabulary [0, {served.vocab_size})", "tokens")
    return {"prompt": state.tokenizer.decode(req.tokens)}

  async def start(req, prompts: list[list[int]], max_new: list[int], logprobs: bool) -> list[Choice]:
    """Queues n engine requests per prompt; all or none (a refusal cancels the ones already queued)."""
    healthy()
    stops = sampling.stop_ids(req, served.eos_ids, served.vocab_size)
    try:
      state.bridge.check_capacity(len(prompts) * req.n)
    except QueueFullError as e:
      raise APIError(429, str(e)) from None
    choices: list[Choice] = []
    try:
      for p, (ids, limit) in enumerate(zip(prompts, max_new)):
        for i, sp in enumerate(sampling.samplings(req, req.n, logprobs)):
          handle = await state.bridge.add(ids, sp, limit, stops)
          choices.append(Choice(p * req.n + i, handle, ids))
    except RequestRejected as e:
      for c in choices:
        state.bridge.cancel(c.handle)
      raise sampling.rejected(e) from None
    except BaseException:
      for c in choices:
        state.bridge.cancel(c.handle)
      raise
    return choices

  def hidden(req) -> tuple[int, ...]:
    return tuple(served.eos_ids) + tuple(req.stop_token_ids or ())

  @app.post("/v1/completions")
  async def completions(req: CompletionRequest, request: Request):
    sampling.check_model(req.model, served.name)
    if req.echo and req.logprobs is not None:
      raise bad_request("logprobs: not available with echo (prompt log-probabilities are not computed)", "logprobs")
    texts, prompts, limits = [], [], []
    for k, p in enumerate(req.prompts()):
      field = "prompt" if len(req.prompts()) == 1 else f"prompt.{k}"
      ids = sampling.encode(state.tokenizer, p, field) if isinstance(p, str) else p
      limits.append(sampling.check(ids, req.max_tokens, (), state.engine_config, served.vocab_size, field))
      prompts.append(ids)
      texts.append(p if isinstance(p, str) else state.tokenizer.decode(p))
    want_logprobs = req.logprobs is not None
    choices = await start(req, prompts, limits, want_logprobs)
    r = Renderer("text_completion", served.name, token_text_fn(state.tokenizer, req.return_tokens_as_token_ids),
                 req.include_usage)
    echo = {c.index: texts[c.index // req.n] for c in choices} if req.echo else {}

    def choice_obj(c, text, finish, ids, lps, before):
      lp = r.completion_logprobs(c.index, ids, lps, before) if want_logprobs else None
      return r.completion_choice(c.index, text, finish, lp)

    if req.stream:
      async def events():
        sent: dict[int, int] = {}
        async for c, d in merged(choices, hidden(req), req.stop_strings):
          text = echo.pop(c.index, "") + d.text
          if not text and d.finish_reason is None and not want_logprobs:
            continue
          yield sse(r.chunk([choice_obj(c, text, d.finish_reason, d.token_ids, d.logprobs or [],
                                        sent.get(c.index, 0))]))
          sent[c.index] = sent.get(c.index, 0) + len(text)
        if req.include_usage:
          yield sse(r.chunk([], usage(prompt_tokens(prompts), sum(len(c.token_ids) for c in choices))))
        yield sse_done()
      return StreamingResponse(events(), media_type="text/event-stream")

    await collect(request, choices, hidden(req), req.stop_strings)
    objs = [choice_obj(c, (texts[c.index // req.n] if req.echo else "") + c.text, c.finish_reason, c.token_ids,
                       c.logprobs, 0) for c in choices]
    return JSONResponse(r.whole(objs, usage(prompt_tokens(prompts), sum(len(c.token_ids) for c in choices))))

  @app.post("/v1/chat/completions")
  async def chat(req: ChatCompletionRequest, request: Request):
    sampling.check_model(req.model, served.name)
    text = render_chat(req.messages, req.add_generation_prompt, req.chat_template_kwargs)
    ids = encode(state.tokenizer, text, False)
    if not ids:
      raise bad_request("messages: the rendered prompt is empty", "messages")
    limit = sampling.check(ids, req.max_new_tokens, (), state.engine_config, served.vocab_size, "messages")
    choices = await start(req, [ids], [limit], req.logprobs)
    r = Renderer("chat.completion", served.name, token_text_fn(state.tokenizer, req.return_tokens_as_token_ids),
                 req.include_usage)
    top = req.top_logprobs or 0

    if req.stream:
      async def events():
        for c in choices:
          yield sse(r.chunk([r.chat_delta(c.index, {"role": "assistant", "content": ""}, None)]))
        async for c, d in merged(choices, hidden(req), req.stop_strings):
          if not d.text and d.finish_reason is None and not req.logprobs:
            continue
          lp = r.chat_logprobs(d.token_ids, d.logprobs or [], top) if req.logprobs else None
          yield sse(r.chunk([r.chat_delta(c.index, {"content": d.text} if d.text else {}, d.finish_reason, lp)]))
        if req.include_usage:
          yield sse(r.chunk([], usage(len(ids), sum(len(c.token_ids) for c in choices))))
        yield sse_done()
      return StreamingResponse(events(), media_type="text/event-stream")

    await collect(request, choices, hidden(req), req.stop_strings)
    objs = [r.chat_choice(c.index, c.text, c.finish_reason,
                          r.chat_logprobs(c.token_ids, c.logprobs, top) if req.logprobs else None) for c in choices]
    return JSONResponse(r.whole(objs, usage(len(ids), sum(len(c.token_ids) for c in choices))))

  async def merged(choices, hidden_ids, stops):
    """(choice, delta) pairs of every choice as they come; closing this generator cancels them all."""
    out: asyncio.Queue = asyncio.Queue()

    async def pump(c):
      try:
        async for d in deltas(state.bridge, c, state.tokenizer, stops, hidden_ids):
          await out.put((c, d))
      except Exception as e:  # noqa: BLE001 - handed to the stream
        await out.put((c, e))
      finally:
        await out.put((c, None))

    tasks = [asyncio.create_task(pump(c)) for c in choices]
    try:
      left = len(tasks)
      while left:
        c, d = await out.get()
        if d is None:
          left -= 1
        elif isinstance(d, Exception):
          raise d
        else:
          yield c, d
    finally:
      for t in tasks:
        t.cancel()

  async def collect(request: Request, choices, hidden_ids, stops) -> None:
    """Runs every choice to its end; a client that disconnects meanwhile cancels them."""
    async def consume():
      async for _ in merged(choices, hidden_ids, stops):
        pass

    async def disconnected():
      while (await request.receive())["type"] != "http.disconnect":
        pass

    work, watch = asyncio.create_task(consume()), asyncio.create_task(disconnected())
    try:
      done, _ = await asyncio.wait({work, watch}, return_when=asyncio.FIRST_COMPLETED)
    finally:
      watch.cancel()
      if not work.done():
        work.cancel()
    if work in done:
      work.result()
    else:
      raise APIError(499, "client disconnected")

  return app


def prompt_tokens(prompts) -> int:
  return sum(len(p) for p in prompts)
