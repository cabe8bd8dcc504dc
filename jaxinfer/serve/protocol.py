"""Request bodies of the OpenAI API (and vLLM's /tokenize, /detokenize), as pydantic models.

Unknown fields are refused (a typo is a 400 naming it, not a silent default); fields the engine cannot honour
(penalties, logit_bias, best_of, more than the chosen token's log-probability) accept only their neutral value.
vLLM's extensions that load generators use are accepted: top_k, min_p, stop_token_ids, ignore_eos,
return_tokens_as_token_ids, add_generation_prompt, chat_template_kwargs.
"""

from __future__ import annotations

from typing import Literal, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator

MAX_N = 64


class _Body(BaseModel):
  model_config = ConfigDict(extra="forbid")


class StreamOptions(_Body):
  include_usage: bool = False
  continuous_usage_stats: bool = False


class _Sampling(_Body):
  model: str | None = None
  temperature: float = Field(1.0, ge=0.0)
  top_p: float = Field(1.0, gt=0.0, le=1.0)
  top_k: int = Field(0, ge=-1)  # 0 or -1: off
  min_p: float = Field(0.0, ge=0.0, le=1.0)
  seed: int | None = Field(None, ge=0, lt=2**32)
  stop: Union[str, list[str], None] = None
  stop_token_ids: list[int] | None = None
  n: int = Field(1, ge=1, le=MAX_N)
  stream: bool = False
  stream_options: StreamOptions | None = None
  ignore_eos: bool = False
  return_tokens_as_token_ids: bool = False
  presence_penalty: float = 0.0
  frequency_penalty: float = 0.0
  logit_bias: dict[str, float] | None = None
  user: str | None = None

  @field_validator("presence_penalty", "frequency_penalty")
  @classmethod
  def _no_penalty(cls, v):
    if v != 0:
      raise ValueError("penalties are not supported by this server; only 0 is accepted")
    return v

  @field_validator("logit_bias")
  @classmethod
  def _no_bias(cls, v):
    if v:
      raise ValueError("logit_bias is not supported by this server")
    return v

  @field_validator("stop")
  @classmethod
  def _stops(cls, v):
    stops = [v] if isinstance(v, str) else (v or [])
    if any(not s for s in stops):
      raise ValueError("stop strings must be non-empty")
    return v

  @property
  def stop_strings(self) -> list[str]:
    return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])

  @property
  def include_usage(self) -> bool:
    return bool(self.stream_options and self.stream_options.include_usage)


class CompletionRequest(_Sampling):
  prompt: Union[str, list[str], list[int], list[list[int]]]
  max_tokens: int | None = Field(16, ge=1)
  logprobs: int | None = Field(None, ge=0, le=1)  # the chosen token's log-probability only
  echo: bool = False
  best_of: int | None = Field(None, ge=1, le=1)
  suffix: None = None

  def prompts(self) -> list[Union[str, list[int]]]:
    """The batch of prompts: one string, one list of ids, or a list of either."""
    p = self.prompt
    if isinstance(p, str):
      return [p]
    if not p:
      return [p]  # an empty prompt: rejected later, naming it
    if all(isinstance(x, int) for x in p):
      return [list(p)]
    return list(p)


class TextPart(_Body):
  type: Literal["text"]
  text: str


class ChatMessage(BaseModel):
  model_config = ConfigDict(extra="allow")  # name, tool_calls, ...: handed to the template as they are
  role: Literal["system", "developer", "user", "assistant", "tool"]
  content: Union[str, list[TextPart], None] = None

  def text(self) -> str:
    if isinstance(self.content, list):
      return "".join(part.text for part in self.content)
    return self.content or ""


class ChatCompletionRequest(_Sampling):
  messages: list[ChatMessage] = Field(min_length=1)
  max_tokens: int | None = Field(None, ge=1)
  max_completion_tokens: int | None = Field(None, ge=1)
  logprobs: bool = False
  top_logprobs: int | None = Field(None, ge=0, le=1)
  add_generation_prompt: bool = True
  chat_template_kwargs: dict | None = None

  @property
  def max_new_tokens(self) -> int | None:
    return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


class TokenizeRequest(_Body):
  model: str | None = None
  prompt: str | None = None
  messages: list[ChatMessage] | None = None
  add_special_tokens: bool = True
  add_generation_prompt: bool = True


class DetokenizeRequest(_Body):
  model: str | None = None
  tokens: list[int]
