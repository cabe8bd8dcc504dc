"""Request fields -> what the engine takes: prompt token ids, SamplingParams per choice, limits, stop ids.
Every refusal is a 400 naming the field and the limit (the engine's own request checks, run here first so
that nothing bad reaches the engine thread)."""

from __future__ import annotations

import random

from jaxinfer.engine.request import RequestRejected
from jaxinfer.engine.validate import check_request
from jaxinfer.generation.sampling import SamplingParams
from jaxinfer.serve.errors import APIError, bad_request


def check_model(requested: str | None, served_name: str) -> None:
  if requested not in (None, "", served_name):
    raise APIError(404, f"The model `{requested}` does not exist; this server serves `{served_name}`", "model")


def encode(tokenizer, text: str, field: str) -> list[int]:
  ids = tokenizer.encode(text)
  if not ids:
    raise bad_request(f"{field}: the prompt is empty (it encodes to no tokens)", field)
  return ids


def samplings(req, count: int, logprobs: bool) -> list[SamplingParams]:
  """One SamplingParams per choice: choice i of a seeded request gets seed + i (so choices differ), an unseeded
  one a fresh random seed."""
  base = req.seed if req.seed is not None else random.randrange(2**32 - count)
  top_k = 0 if req.top_k in (-1, 0) else req.top_k
  return [SamplingParams(temperature=req.temperature, top_k=top_k, top_p=req.top_p, min_p=req.min_p,
                         seed=(base + i) % 2**32, logprobs=logprobs) for i in range(count)]


def stop_ids(req, eos_ids, vocab: int) -> tuple[int, ...]:
  ids = [] if req.ignore_eos else list(eos_ids)
  for t in req.stop_token_ids or ():
    if not 0 <= t < vocab:
      raise bad_request(f"stop_token_ids: token id {t} is outside the vocabulary [0, {vocab})", "stop_token_ids")
    ids.append(t)
  return tuple(ids)


def check(prompt_ids, max_new_tokens, stops, engine_config, vocab: int, field: str) -> int:
  """The engine's request checks, as a 400 naming `field` (or max_tokens); returns max_new_tokens resolved."""
  ec = engine_config
  try:
    _, _, resolved, _ = check_request(prompt_ids, None, max_new_tokens, stops, vocab=vocab,
                                      max_model_len=ec.max_model_len, num_pages=ec.num_pages,
                                      page_size=ec.page_size, name=field)
  except RequestRejected as e:
    message = str(e)
    param = "max_tokens" if "max_new_tokens" in message else field
    raise bad_request(message.replace("max_new_tokens", "max_tokens"), param) from None
  return resolved


def rejected(e: RequestRejected) -> APIError:
  """An engine refusal that got past the checks above (the queue filled meanwhile): 429 or 400."""
  from jaxinfer.engine.request import QueueFullError

  if isinstance(e, QueueFullError):
    return APIError(429, str(e))
  return bad_request(str(e), "prompt")
