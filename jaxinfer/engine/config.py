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
from jaxinfer.engine.speculative.config import SpeculativeConfig
from jaxinfer.engine.kv_policies.config import KVPolicyConfig


# KV policies that run with enable_shared_prefix_attention ("none" included): each has a plain_view hook
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
  # KV cache storage (docs/kv_quantization.md): None: kv_dtype (itself None: the model's dtype); "int8" /
  # "float8_e4m3fn": a quantized pool with float32 scales, dequantized inside the attention kernels; a float
  # name ("bfloat16", "float32"): a plain pool of that dtype. When set it supersedes kv_dtype (setting both to
  # different values is an error).
  kv_cache_dtype: str | None = None
  kv_cache_bytes: int | None = None  # KV byte budget: num_pages = budget // bytes per page (excludes num_pages)
  kv_quant_key_granularity: str = "per_channel"  # quantized keys: "per_channel" (per page) or "per_token"
  speculative: SpeculativeConfig | None = None  # speculative decoding (docs/speculative.md); None: off
  kv_policy: KVPolicyConfig = dataclasses.field(default_factory=KVPolicyConfig)  # KV eviction (kv_policies/)

  def __post_init__(self):
    _check_speculative(self)
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
    if self.kv_policy.name != "none" and (self.max_rows_per_seq > 1 or self.speculative is not None):
      from jaxinfer.engine.kv_policies.speculative import check

      check(self)  # chain verification with streaming / snapkv / h2o*; tree verification and duo refused
      if self.enable_shared_prefix_attention:
        raise ConfigError(f"engine.kv_policy.name: kv_policy {self.kv_policy.name!r} runs with speculative "
                          "verification or with shared-prefix attention, not with both at once")
    # shared-prefix attention runs with every KV policy: a sequence joins a prefix group only while its policy's
    # plain_view says its view is the plain causal one (kv_policies/base.py; False by default: never grouped)
    if self.kv_dtype is not None:
      import jax.numpy as jnp

      try:
        jnp.dtype(self.kv_dtype)
      except TypeError:
        raise ConfigError(f"engine.kv_dtype: {self.kv_dtype!r} is not a dtype name") from None
    _check_kv_cache(self)

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
    if self.kv_cache_bytes is not None:  # the byte budget decides the pool size (kv_cache_dtype aware)
      return dataclasses.replace(self, num_pages=pages_for_budget(self, model_config), kv_cache_bytes=None
                                 ).resolve(model_config)
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


KV_CACHE_DTYPES = (None, "bfloat16", "float16", "float32", "int8", "float8_e4m3fn")


def _check_kv_cache(cfg: EngineConfig) -> None:
  """engine.kv_cache_dtype / kv_cache_bytes / kv_quant_key_granularity."""
  from jaxinfer.engine.kv_quant import KEY_GRANULARITIES, QMAX

  if cfg.kv_cache_dtype not in KV_CACHE_DTYPES:
    raise ConfigError(f"engine.kv_cache_dtype: {cfg.kv_cache_dtype!r} is not one of {list(KV_CACHE_DTYPES)}")
  if cfg.kv_cache_dtype is not None and cfg.kv_dtype is not None and cfg.kv_cache_dtype != cfg.kv_dtype:
    raise ConfigError(f"engine.kv_cache_dtype: kv_cache_dtype={cfg.kv_cache_dtype!r} conflicts with "
                      f"kv_dtype={cfg.kv_dtype!r}; set one of them (kv_cache_dtype supersedes kv_dtype)")
  if cfg.kv_dtype is not None and cfg.kv_dtype in QMAX:
    raise ConfigError(f"engine.kv_dtype: {cfg.kv_dtype!r} is a quantized dtype; use kv_cache_dtype for it")
  if cfg.kv_quant_key_granularity not in KEY_GRANULARITIES:
    raise ConfigError(f"engine.kv_quant_key_granularity: {cfg.kv_quant_key_granularity!r} is not one of "
                      f"{list(KEY_GRANULARITIES)}")
  if cfg.kv_cache_bytes is not None:
    _positive("kv_cache_bytes", cfg.kv_cache_bytes)
    if cfg.num_pages is not None:
      raise ConfigError(f"engine.kv_cache_bytes: kv_cache_bytes={cfg.kv_cache_bytes} and num_pages="
                        f"{cfg.num_pages} both size the pool; set one of them")
  if cfg.kv_cache_dtype in QMAX and cfg.enable_shared_prefix_attention:
    raise ConfigError(f"engine.kv_cache_dtype: kv_cache_dtype={cfg.kv_cache_dtype!r} does not support "
                      "enable_shared_prefix_attention=True (the shared-prefix kernel reads float pages only)")


def cache_dtype(cfg: EngineConfig, model_config) -> str:
  """The pool's dtype name: kv_cache_dtype, else kv_dtype, else the model's dtype."""
  import jax.numpy as jnp

  return jnp.dtype(cfg.kv_cache_dtype or cfg.kv_dtype or model_config.dtype).name


def pages_for_budget(cfg: EngineConfig, model_config) -> int:
  """Pages of the pool that fit in kv_cache_bytes (scales included); ConfigError if not even one."""
  from jaxinfer.engine.kv_quant import page_bytes

  per_page = page_bytes(model_config, cfg.page_size, cache_dtype(cfg, model_config), cfg.kv_quant_key_granularity)
  pages = cfg.kv_cache_bytes // per_page
  if pages < 1:
    raise ConfigError(f"engine.kv_cache_bytes: kv_cache_bytes={cfg.kv_cache_bytes} holds no page (one page of "
                      f"{cfg.page_size} tokens takes {per_page} bytes with {cache_dtype(cfg, model_config)})")
  return int(pages)


def _check_speculative(cfg: EngineConfig) -> None:
  """speculative: None, a SpeculativeConfig, or its section / dict (converted, errors naming the field)."""
  value = cfg.speculative
  if value is None or isinstance(value, SpeculativeConfig):
    return
  if not hasattr(value, "keys"):
    raise ConfigError(f"engine.speculative: must be a SpeculativeConfig (or its section), got {value!r}")
  from jaxinfer.config.schema import from_section

  object.__setattr__(cfg, "speculative", from_section(SpeculativeConfig, value, "engine.speculative"))
