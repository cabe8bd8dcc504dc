"""DuoAttention-style head budgets (Xiao et al., 2024): retrieval heads keep the full KV; streaming heads
keep only sinks + window. Heads come as config.head_classes, or from `calibrate` below.

Identification here is NOT the paper's (an optimisation of per-head gates on synthetic passkey data): it is an
attention-mass criterion on calibration text (the stdlib's own source in the experiment): for every (layer,
kv head), the share of attention that queries past sink_tokens + window give to keys outside their sinks +
window; the `retrieval_heads` fraction of heads with the largest share are retrieval heads.

Layout (policy "duo", realised): the paged pool holds only each layer's retrieval KV heads, the streaming
heads live in a fixed store of sinks + window slots per request row (duo_store.py), so a page costs
R_l / num_kv_heads of a full one and engine.kv_cache_bytes (less the store's fixed bytes) buys
num_kv_heads / R more pages (pages_for_budget). A quantized pool (kv_cache_dtype int8 / float8_e4m3fn)
quantizes both: the pages with the pool's own layout, the store per token. The one-pool masked layout is
policy "duo_masked" (duo_masked.py), the ablation, and what a sharded model must use when its head classes
do not fall evenly on the shards (refused here, no fallback).
"""

from __future__ import annotations

import numpy as np

from jaxinfer.config.schema import ConfigError
from jaxinfer.engine.kv_policies.base import EvictionPolicy
from jaxinfer.engine.kv_policies.registry import register
from jaxinfer.models.rope import inverse_frequencies


def parse_classes(config, model_config) -> tuple:
  """config.head_classes, checked against the model: one string of num_kv_heads 'r'/'s' per layer."""
  classes = config.head_classes
  if len(classes) != model_config.num_layers or any(len(c) != model_config.num_kv_heads for c in classes):
    raise ConfigError(f"engine.kv_policy.head_classes: {config.name} needs one string of "
                      f"{model_config.num_kv_heads} 'r'/'s' per layer ({model_config.num_layers} layers), got "
                      f"{classes!r}; compute them with jaxinfer.engine.kv_policies.duo.calibrate")
  return tuple(classes)


def split_heads(config, model_config) -> tuple[tuple, tuple]:
  """(retrieval kv heads per layer, streaming kv heads per layer)."""
  classes = parse_classes(config, model_config)
  return (tuple(tuple(h for h, c in enumerate(row) if c == "r") for row in classes),
          tuple(tuple(h for h, c in enumerate(row) if c == "s") for row in classes))


def _dtype(engine_config, model_config):
  import jax.numpy as jnp

  return jnp.dtype(engine_config.kv_cache_dtype or engine_config.kv_dtype or model_config.dtype)


def page_bytes(config, model_config, engine_config) -> int:
  """Bytes of one page of the realised pool (k and v of the retrieval heads of every layer, scales included):
  a full page's share of R of the num_layers x num_kv_heads heads (every part of a page is per head)."""
  from jaxinfer.engine.kv_quant import page_bytes as full_page_bytes

  ret, _ = split_heads(config, model_config)
  full = full_page_bytes(model_config, engine_config.page_size, _dtype(engine_config, model_config),
                         engine_config.kv_quant_key_granularity)
  return full * sum(len(r) for r in ret) // (model_config.num_layers * model_config.num_kv_heads)


def store_bytes(config, model_config, engine_config) -> int:
  """Fixed bytes of the streaming-head store (k, v, their per-token scales when quantized, and slot positions
  of every layer and request row)."""
  from jaxinfer.engine.kv_quant import QMAX

  _, strm = split_heads(config, model_config)
  rows, slots, dtype = engine_config.max_batch_size, config.sink_tokens + config.window, _dtype(engine_config,
                                                                                               model_config)
  per_head = model_config.resolved_head_dim * dtype.itemsize + (4 if dtype.name in QMAX else 0)
  return sum(2 * rows * slots * per_head * len(s) + rows * slots * 4 for s in strm)


@register("duo")
class DuoPolicy(EvictionPolicy):
  def __init__(self, config, model_config, engine_config):
    super().__init__(config, model_config, engine_config)
    from jaxinfer.engine.kv_policies.duo_store import DuoRule

    self.retrieval, self.streaming = split_heads(config, model_config)
    cache = config.positions == "cache"
    inv = tuple(float(x) for x in inverse_frequencies(model_config)) if cache else ()
    self.rule = DuoRule(sinks=config.sink_tokens, window=config.window, cache_positions=cache, inv_freq=inv,
                        retrieval=self.retrieval, streaming=self.streaming,
                        group=model_config.num_heads // model_config.num_kv_heads)
    self.max_batch_size = engine_config.max_batch_size
    self.store_dtype = engine_config.kv_cache_dtype or engine_config.kv_dtype or model_config.dtype

  @classmethod
  def pages_for_budget(cls, engine_config, model_config) -> int:
    """Pages that fit in engine.kv_cache_bytes once the store's fixed bytes are taken out; a page counts only
    the retrieval heads."""
    config = engine_config.kv_policy
    per_page = page_bytes(config, model_config, engine_config)
    fixed = store_bytes(config, model_config, engine_config)
    if per_page == 0:
      raise ConfigError(f"engine.kv_cache_bytes: duo with no retrieval head keeps no per-token KV, so a byte "
                        f"budget sizes nothing; set engine.num_pages instead (head_classes={config.head_classes!r})")
    pages = (engine_config.kv_cache_bytes - fixed) // per_page
    if pages < 1:
      raise ConfigError(f"engine.kv_cache_bytes: kv_cache_bytes={engine_config.kv_cache_bytes} holds no page "
                        f"after duo's streaming-head store ({fixed} bytes; a page of retrieval heads takes "
                        f"{per_page} bytes)")
    return int(pages)

  def layer_kv_heads(self, sharding) -> tuple:
    """KV heads the pool holds per layer (KVPool.create): the retrieval heads only."""
    if sharding is not None:
      self._check_shards(sharding)
    return tuple(len(r) for r in self.retrieval)

  def _check_shards(self, sharding) -> None:
    """A sharded pool splits each layer's pages (retrieval heads) and store (streaming heads) evenly on the
    head axis: every shard's block of kv heads must hold the same number of retrieval heads in each layer."""
    from jaxinfer.engine.kv_policies.duo_store import _head_shards

    tp = _head_shards(sharding)
    block = self.kv_heads // tp if sharding.kv_repeat == 1 else 0
    for layer, row in enumerate(self.config.head_classes):
      counts = {row[i:i + block].count("r") for i in range(0, self.kv_heads, block)} if block else {None}
      if len(counts) != 1 or None in counts:
        raise ConfigError(f"engine.kv_policy.name: duo on a model sharded over {sharding.head_axes} (size {tp}) "
                          f"needs every shard's {block or 'repeated'} kv heads to hold the same number of "
                          f"retrieval heads in each layer (layer {layer}: {row!r}, blocks of {block} heads); "
                          "use name='duo_masked' there, or head classes that split evenly")

  def init_state(self, num_slots: int, rows: int, table_slots: int):
    from jaxinfer.engine.kv_policies.duo_store import DuoState

    return DuoState.create(self.streaming, rows, self.config.sink_tokens + self.config.window,
                           self.model_config.resolved_head_dim, self.store_dtype)

  def step_arrays(self, t_pad: int, s_pad: int) -> dict:
    return dict(policy_reset=np.zeros((s_pad,), bool))

  def fill_rows(self, attn, i: int, request, offset: int, positions: np.ndarray) -> None:
    super().fill_rows(attn, i, request, offset, positions)
    attn.policy_reset[i] = request.request_id not in self.held  # new to its row: the store row starts empty

  def register_limit(self, request) -> int:
    return 0  # a page holds no streaming head's k/v: a prefix hit would leave the store without them

  def on_step(self, request, seq) -> None:
    pass  # nothing to drop: pages are the retrieval heads' (all kept), the store overwrites itself

  def kv_fraction(self, length: int) -> float:
    """KV held at this length as a fraction of full KV (store slots counted as held)."""
    stream = sum(len(s) for s in self.streaming)
    total = self.num_layers * self.kv_heads
    kept = min(length, self.config.sink_tokens + self.config.window)
    return ((total - stream) * length + stream * kept) / (total * length)


def long_range_share(probs: np.ndarray, sinks: int, window: int) -> np.ndarray:
  """probs [heads, q, k] causal attention of one layer (query i at position i) -> [heads] share of the mass
  that queries i >= sinks + window give to keys j >= sinks with i - j >= window."""
  q, k = probs.shape[1:]
  i = np.arange(q)[:, None]
  j = np.arange(k)[None, :]
  outside = (j >= sinks) & (i - j >= window)
  rows = np.arange(q) >= sinks + window
  return (probs * outside)[:, rows].sum(axis=(1, 2)) / max(rows.sum(), 1)


def classify(shares: np.ndarray, fraction: float) -> tuple[str, ...]:
  """shares [layers, kv_heads] -> head_classes: the top `fraction` of heads by share are retrieval ('r')."""
  n = int(round(fraction * shares.size))
  order = np.argsort(-shares.reshape(-1), kind="stable")
  cls = np.full(shares.size, "s")
  cls[order[:n]] = "r"
  return tuple("".join(row) for row in cls.reshape(shares.shape))


def calibrate(model, token_ids, *, sink_tokens: int, window: int, fraction: float) -> tuple[str, ...]:
  """Head classes from one dense forward over token_ids (the attention-mass criterion above)."""
  from jaxinfer.engine.kv_policies.reference import attention_probs

  probs = attention_probs(model, np.asarray(token_ids, np.int32))  # [layers, heads, q, k]
  cfg = model.config
  group = cfg.num_heads // cfg.num_kv_heads
  shares = np.stack([long_range_share(p, sink_tokens, window) for p in probs])  # [layers, heads]
  shares = shares.reshape(cfg.num_layers, cfg.num_kv_heads, group).mean(-1)
  return classify(shares, fraction)
