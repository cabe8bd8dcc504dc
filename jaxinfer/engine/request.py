"""Requests as the engine sees them, what a step returns for each, and the errors of bad requests."""

from __future__ import annotations

import dataclasses
import enum

from jaxinfer.generation.sampling import SamplingParams


class RequestRejected(ValueError):
  """add_request refused a request (bad prompt, limits); nothing was queued. The message names input and limit."""


class QueueFullError(RequestRejected):
  """More requests waiting for admission than the engine's max_queue; retry after some finish."""


class UnknownRequestError(KeyError):
  """A request id this engine never issued."""

  def __str__(self):  # KeyError would print the repr of the message
    return str(self.args[0]) if self.args else ""


class Status(enum.Enum):
  WAITING = "waiting"  # queued (new, or preempted and waiting to be recomputed)
  RUNNING = "running"  # holds pages; prefilling in chunks or decoding
  FINISHED = "finished"


# finish reasons
STOP = "stop"  # sampled one of its stop tokens (included in the output)
LENGTH = "length"  # produced max_new_tokens
CANCELLED = "cancelled"  # engine.cancel(request_id)


@dataclasses.dataclass
class RequestOutput:
  """What one step produced for one request. new_token_ids is a list so that a step that accepts several
  tokens at once (speculative decoding) fits the same type: with speculative decoding it may hold several."""
  request_id: int
  new_token_ids: list[int]
  finished: bool = False
  finish_reason: str | None = None  # "stop", "length", "cancelled" when finished
  logprobs: list[float] | None = None  # log p(token) of each new token, when sampling.logprobs is set
  probs: list | None = None  # the distribution each new token was drawn from, when the engine asked (speculative)


@dataclasses.dataclass(eq=False)
class Request:
  request_id: int
  prompt: list[int]
  sampling: SamplingParams
  max_new_tokens: int
  stop_token_ids: frozenset
  arrival: int  # admission priority: lower arrived earlier (and is preempted last)
  output: list[int] = dataclasses.field(default_factory=list)
  logprobs: list[float] = dataclasses.field(default_factory=list)
  status: Status = Status.WAITING
  pages: list[int] = dataclasses.field(default_factory=list)
  num_computed: int = 0  # tokens whose k/v are in the pool
  num_preemptions: int = 0
  finish_reason: str | None = None
  # prefix caching: chain hashes of the full pages of its tokens (computed as needed; tokens never change, so
  # they survive preemption), how many of `pages` are known to the cache, tokens reused at admission
  page_hashes: list[int] = dataclasses.field(default_factory=list)
  num_registered_pages: int = 0
  num_cached_tokens: int = 0
  # async scheduling: tokens sampled by steps still running on the device (counted in num_tokens, not yet in
  # output: the host only knows their positions)
  num_inflight: int = 0

  @property
  def num_tokens(self) -> int:
    """Prompt plus generated tokens (those still on the device included)."""
    return len(self.prompt) + len(self.output) + self.num_inflight

  @property
  def num_resolved(self) -> int:
    """Prompt plus generated tokens the host knows."""
    return len(self.prompt) + len(self.output)

  @property
  def done_scheduling(self) -> bool:
    """Every token it may generate has been asked of some step (the last results may still be running)."""
    return len(self.output) + self.num_inflight >= self.max_new_tokens

  @property
  def num_pending(self) -> int:
    """Tokens still to run through the model before the next token can be sampled (1 when decoding)."""
    return self.num_tokens - self.num_computed

  def token_slice(self, start: int, stop: int) -> list[int]:
    if stop > self.num_resolved:
      raise ValueError(f"request {self.request_id}: tokens up to {stop} asked, {self.num_resolved} known")
    p = len(self.prompt)
    if stop <= p:
      return self.prompt[start:stop]
    return (self.prompt + self.output)[start:stop] if start < p else self.output[start - p:stop - p]
