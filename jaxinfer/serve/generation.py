"""One choice of one request: the engine's tokens -> text deltas, through the incremental detokenizer and the
stop-string matcher. A matched stop string cancels the engine request (its pages go back at the next step)
and ends the choice with finish_reason "stop"; a consumer that stops listening (client disconnect) cancels it
too."""

from __future__ import annotations

import dataclasses
from typing import AsyncIterator

from jaxinfer.serve.detokenizer import IncrementalDetokenizer
from jaxinfer.serve.stop import StopMatcher

FINISH = {"stop": "stop", "length": "length", "cancelled": "abort"}


@dataclasses.dataclass
class Delta:
  """New text of a choice, the tokens that produced it (with log-probabilities when asked) and, on the last
  delta, the finish reason ("stop", "length" or "abort")."""
  text: str
  token_ids: list[int]
  logprobs: list[float] | None
  finish_reason: str | None = None


@dataclasses.dataclass
class Choice:
  index: int
  handle: object  # bridge.Handle
  prompt_ids: list[int]
  text: str = ""
  token_ids: list[int] = dataclasses.field(default_factory=list)
  logprobs: list[float] = dataclasses.field(default_factory=list)
  finish_reason: str | None = None


async def deltas(bridge, choice: Choice, tokenizer, stops=(), hidden_ids=()) -> AsyncIterator[Delta]:
  """The choice's deltas until it finishes; fills choice.text / token_ids / logprobs / finish_reason.
  `hidden_ids` (the eos token) are counted as generated but never shown as text."""
  detok = IncrementalDetokenizer(tokenizer, skip_ids=hidden_ids)
  matcher = StopMatcher(stops)
  handle = choice.handle
  try:
    while True:
      out = await handle.queue.get()
      if isinstance(out, Exception):
        raise out
      ids = list(out.new_token_ids)
      text = matcher.add(detok.add(ids))
      if out.finished:
        text += matcher.add(detok.flush())
        if matcher.stopped is None:
          text += matcher.flush()
      choice.token_ids += ids
      if out.logprobs is not None:
        choice.logprobs += list(out.logprobs)
      choice.text += text
      if matcher.stopped is not None:
        handle.stopped_by_string = True
        bridge.cancel(handle)
        choice.finish_reason = "stop"
      elif out.finished:
        choice.finish_reason = FINISH.get(out.finish_reason, out.finish_reason)
      yield Delta(text, ids, None if out.logprobs is None else list(out.logprobs), choice.finish_reason)
      if choice.finish_reason is not None:
        return
  finally:
    if choice.finish_reason is None:  # the consumer left early (client disconnected)
      bridge.cancel(handle)
