"""OpenAI response objects (completions, chat completions, their streamed chunks, usage) and SSE framing."""

from __future__ import annotations

import json
import time
import uuid


def new_id(prefix: str) -> str:
  return f"{prefix}-{uuid.uuid4().hex}"


def sse(obj) -> str:
  """One server-sent event; the stream ends with sse_done()."""
  return f"data: {json.dumps(obj, ensure_ascii=False, separators=(',', ':'))}\n\n"


def sse_done() -> str:
  return "data: [DONE]\n\n"


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
  return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
          "total_tokens": prompt_tokens + completion_tokens}


class Renderer:
  """Builds the response objects of one request: `kind` "text_completion" or "chat.completion"."""

  def __init__(self, kind: str, model: str, token_text, include_usage: bool = False):
    self.kind, self.model, self.token_text = kind, model, token_text
    self.id = new_id("cmpl" if kind == "text_completion" else "chatcmpl")
    self.created = int(time.time())
    self.include_usage = include_usage
    self._offsets: dict[int, int] = {}  # completions logprobs: text offset per choice

  # ---------------------------------------------------------------- log-probabilities
  def completion_logprobs(self, index: int, token_ids, logprobs, text_before: int) -> dict:
    tokens = [self.token_text(t) for t in token_ids]
    offset = self._offsets.get(index, text_before)
    offsets = []
    for t in tokens:
      offsets.append(offset)
      offset += len(t)
    self._offsets[index] = offset
    return {"tokens": tokens, "token_logprobs": list(logprobs), "top_logprobs": [{t: lp} for t, lp in
                                                                              zip(tokens, logprobs)],
            "text_offset": offsets}

  def chat_logprobs(self, token_ids, logprobs, top: int) -> dict:
    content = []
    for t, lp in zip(token_ids, logprobs):
      text = self.token_text(t)
      entry = {"token": text, "logprob": lp, "bytes": list(text.encode("utf-8"))}
      entry["top_logprobs"] = [dict(entry)] if top else []
      content.append(entry)
    return {"content": content}

  # ---------------------------------------------------------------- objects
  def _object(self, choices, streamed: bool, usage_obj=None) -> dict:
    kind = self.kind + (".chunk" if streamed and self.kind == "chat.completion" else "")
    out = {"id": self.id, "object": kind, "created": self.created, "model": self.model, "choices": choices}
    if not streamed or self.include_usage:
      out["usage"] = usage_obj
    return out

  def completion_choice(self, index: int, text: str, finish_reason, logprobs=None) -> dict:
    return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish_reason}

  def chat_choice(self, index: int, text: str, finish_reason, logprobs=None) -> dict:
    return {"index": index, "message": {"role": "assistant", "content": text}, "logprobs": logprobs,
            "finish_reason": finish_reason}

  def chat_delta(self, index: int, delta: dict, finish_reason, logprobs=None) -> dict:
    return {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}

  def whole(self, choices, usage_obj) -> dict:
    return self._object(choices, False, usage_obj)

  def chunk(self, choices, usage_obj=None) -> dict:
    return self._object(choices, True, usage_obj)
