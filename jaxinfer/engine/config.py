"""EngineConfig: every knob of jaxinfer.Engine, one frozen validated dataclass; also the config section `engine`.

  engine = jaxinfer.Engine(model, jaxinfer.EngineConfig(max_batch_size=16, page_size=16))
  engine = jaxinfer.Engine(model, max_batch_size=16, page_size=16)        # keyword overrides, same fields
  section = jaxinfer.config.engine_section(page_size=32)                  # ml-collections: --config.engine.*
  cfg = jaxinfer.config.from_section(EngineConfig, section, "engine")

Fields that depend on the model (num_pages, max_model_len when None) are filled in by `resolve(model_config)`,
which also checks what only the model can tell (max_position_embeddings, the budget without chunked prefill).
Every error is a ConfigError (a ValueError) whose message starts with `engine.<field>: `.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from jaxinfer.config.schema import ConfigError
from jaxinfer.engine.kv_policies.config import KVPolicyConfig


def _positive(name: str, value) -> None:
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
    raise ConfigError(f"engine.{name}: {name} must be a positive integer, got {value!r}")


@dataclasses.dataclass(frozen=True)
class EngineConfig:
  """See docs/engine.md for the meaning of each field."""

  SECTION = "engine"

  max_batch_size: int = 32  # most requests running (holding pages) at once = most sequences in one step
  page_size: int = 16  # tokens per KV page
  num_pages: int | None = None  # pages in the pool; None: max_batch_size sequences of max_model_len
  max_step_tokens: int = 256  # token budget of one step (decodes + prefill chunks + verification rows)
  max_queue: int = 1024  # most new requests waiting for admission
  max_model_len: int | None = None  # longest prompt + new tokens; None: min(max_position_embeddings, pool)
  chunked_prefill: bool = True  # False: prompts only ever scheduled whole
  # smallest padded token count of a step. None: a decode-only step is padded to its sequence bucket only and
  # a step with prefill to at least 16; a number: every step is padded to at least that many tokens
  min_token_bucket: int | None = None
  min_seq_bucket: int = 4  # smallest padded sequence count
  kv_dtype: str | None = None  # dtype of the KV pool; None: the model's compute dtype
  attention_impl: str | None = None  # pallas_kernels.ragged_paged_attention implementation (None: best)
  interpret: bool = False  # Pallas kernels in interpret mode (CPU tests)
  separate_compile: bool = False  # compile each new step shape in an empty step first (benchmarks)
  async_scheduling: bool = True  # run()/stream(): build step N+1 while step N runs, process N one step late
  max_rows_per_seq: int = 1  # most rows one sequence may sample in a step (> 1: speculative verification)
  track_slot_positions: bool = False  # keep each pool slot's token position on the device (for KV policies)
  enable_prefix_caching: bool = False
  enable_shared_prefix_attention: bool = False  # Hydragen; needs enable_prefix_caching
  max_prefix_groups: int = 4
  min_shared_prefix_pages: int = 1
  shared_prefix_impl: str | None = None  # pallas_kernels.shared_prefix_attention.paged_prefix_attention impl
  kv_policy: KVPolicyConfig = dataclasses.field(default_factory=KVPolicyConfig)  # KV eviction (kv_policies/)

  def __post_init__(self):
    for name in ("max_batch_size", "page_size", "max_step_tokens", "max_queue", "min_seq_bucket",
                 "max_rows_per_seq", "max_prefix_groups", "min_shared_prefix_pages"):
      _positive(name, getattr(self, name))
    for name in ("num_pages", "max_model_len", "min_token_bucket"):
      if getattr(self, name) is not None:
        _positive(name, getattr(self, name))
    for name in ("chunked_prefill", "interpret", "separate_compile", "async_scheduling", "track_slot_positions",
                 "enable_prefix_caching", "enable_shared_prefix_attention"):
      if not isinstance(getattr(self, name), (bool, np.bool_)):
        raise ConfigError(f"engine.{name}: must be True or False, got {getattr(self, name)!r}")
    if self.max_step_tokens < self.max_batch_size:
      raise ConfigError(f"engine.max_step_tokens: max_step_tokens={self.max_step_tokens} must be >= "
                        f"max_batch_size={self.max_batch_size}, or running decodes could not all fit in one step")
    if self.enable_shared_prefix_attention and not self.enable_prefix_caching:
      raise ConfigError("engine.enable_shared_prefix_attention: enable_shared_prefix_attention=True needs "
                        "enable_prefix_caching=True (sequences only share prefix pages through the prefix cache)")
    if self.shared_prefix_impl is not None:
      from pallas_kernels.shared_prefix_attention import PAGED_IMPLEMENTATIONS

      if self.shared_prefix_impl not in PAGED_IMPLEMENTATIONS:
        raise ConfigError(f"engine.shared_prefix_impl: shared_prefix_impl={self.shared_prefix_impl!r} is not one "
                          f"of {sorted(PAGED_IMPLEMENTATIONS)}")
    if not isinstance(self.kv_policy, KVPolicyConfig):
      raise ConfigError(f"engine.kv_policy: must be a KVPolicyConfig, got {type(self.kv_policy).__name__}")
    if self.kv_policy.name != "none" and (self.max_rows_per_seq > 1 or self.enable_shared_prefix_attention):
      raise ConfigError(f"engine.kv_policy.name: kv_policy {self.kv_policy.name!r} does not run with "
                        "speculative verification (max_rows_per_seq > 1) or shared-prefix attention")
    if self.kv_dtype is not None:
      import jax.numpy as jnp

      try:
        jnp.dtype(self.kv_dtype)
      except TypeError:
        raise ConfigError(f"engine.kv_dtype: {self.kv_dtype!r} is not a dtype name") from None

  @classmethod
  def from_kwargs(cls, config: "EngineConfig | None" = None, **overrides) -> "EngineConfig":
    """`config` (or the defaults) with keyword overrides; an unknown keyword is a ConfigError naming it."""
    base = config if config is not None else cls()
    if not isinstance(base, cls):
      from jaxinfer.config.schema import from_section

      base = from_section(cls, base, cls.SECTION)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(overrides) - known)
    if unknown:
      raise ConfigError(f"engine.{unknown[0]}: unknown field; known fields: {', '.join(sorted(known))}")
    return dataclasses.replace(base, **overrides) if overrides else base

  def resolve(self, model_config) -> "EngineConfig":
    """num_pages and max_model_len filled in for this model, and the checks that need the model."""
    max_model_len, num_pages = self.max_model_len, self.num_pages
    if max_model_len is None and num_pages is None:
      max_model_len = model_config.max_position_embeddings
    if num_pages is None:
      num_pages = self.max_batch_size * -(-max_model_len // self.page_size)
    if max_model_len is None:
      max_model_len = min(model_config.max_position_embeddings, num_pages * self.page_size)
    if max_model_len > model_config.max_position_embeddings:
      raise ConfigError(f"engine.max_model_len: max_model_len={max_model_len} exceeds the model's "
                        f"max_position_embeddings={model_config.max_position_embeddings}")
    if not self.chunked_prefill and self.max_step_tokens < max_model_len + self.max_batch_size - 1:
      raise ConfigError(f"engine.max_step_tokens: without chunked prefill max_step_tokens={self.max_step_tokens} "
                        f"must be >= max_model_len + max_batch_size - 1 = {max_model_len + self.max_batch_size - 1}"
                        " so a whole prompt always fits beside the running decodes")
    return dataclasses.replace(self, num_pages=int(num_pages), max_model_len=int(max_model_len))
