"""Token sampling from logits: greedy, temperature, top-k, top-p, min-p; per-row parameters and keys."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class SamplingParams:
  temperature: float = 0.0  # 0 = greedy
  top_k: int = 0  # 0 = off
  top_p: float = 1.0  # 1 = off
  min_p: float = 0.0  # 0 = off
  seed: int = 0
  logprobs: bool = False  # engine: also return log p(chosen token) under the model's raw distribution

  def __post_init__(self):
    if not self.temperature >= 0:
      raise ValueError(f"SamplingParams.temperature must be >= 0, got {self.temperature}")
    if self.top_k < 0:
      raise ValueError(f"SamplingParams.top_k must be >= 0, got {self.top_k}")
    if not 0 < self.top_p <= 1:
      raise ValueError(f"SamplingParams.top_p must be in (0, 1], got {self.top_p}")
    if not 0 <= self.min_p <= 1:
      raise ValueError(f"SamplingParams.min_p must be in [0, 1], got {self.min_p}")


MAX_FAST_TOP_K = 256  # top-k up to this is found with lax.top_k; larger k (rare) falls back to a full sort


def _kth_largest(scaled, top_k):
  """[b, 1]: each row's top_k-th largest value (lax.top_k over MAX_FAST_TOP_K values, not a vocabulary sort)."""
  vocab = scaled.shape[-1]
  k_static = min(vocab, MAX_FAST_TOP_K)
  idx = jnp.clip(top_k - 1, 0, vocab - 1)[:, None]

  def fast(_):
    values, _ = jax.lax.top_k(scaled, k_static)
    return jnp.take_along_axis(values, jnp.minimum(idx, k_static - 1), axis=-1)

  def full(_):
    return jnp.take_along_axis(-jnp.sort(-scaled, axis=-1), idx, axis=-1)

  return jax.lax.cond(jnp.all(top_k <= k_static), fast, full, None)


def _nucleus_floor(scaled, top_p):
  """[b, 1]: the smallest logit still inside each row's top-p nucleus (needs the sorted row)."""
  sorted_desc = -jnp.sort(-scaled, axis=-1)
  probs_sorted = jax.nn.softmax(sorted_desc, axis=-1)
  mass_before = jnp.cumsum(probs_sorted, axis=-1) - probs_sorted
  # the first token is always kept; rows with top_p >= 1 keep everything (cumsum rounding must not drop tails,
  # or a row's draws would depend on whether another row in the batch asked for a filter)
  in_nucleus = (mass_before < top_p[:, None]) | (top_p >= 1.0)[:, None]
  # smallest logit still inside the nucleus; ties at the boundary are kept
  return jnp.min(jnp.where(in_nucleus, sorted_desc, jnp.inf), axis=-1, keepdims=True)


def _filter_logits(scaled, top_k, top_p, min_p):
  """-inf outside the top-k / nucleus / min-p set of each row; parameters are per row, dynamic. The sort that
  top-p needs runs only when some row asks for top-p."""
  kth = jax.lax.cond(jnp.any(top_k > 0), lambda s: _kth_largest(s, top_k),
                     lambda s: jnp.full(s.shape[:1] + (1,), -jnp.inf, s.dtype), scaled)
  keep = jnp.where((top_k > 0)[:, None], scaled >= kth, True)
  floor = jax.lax.cond(jnp.any(top_p < 1.0), lambda s: _nucleus_floor(s, top_p),
                       lambda s: jnp.full(s.shape[:1] + (1,), -jnp.inf, s.dtype), scaled)
  keep &= scaled >= floor
  probs = jax.nn.softmax(scaled, axis=-1)
  keep &= probs >= min_p[:, None] * jnp.max(probs, axis=-1, keepdims=True)
  return jnp.where(keep, scaled, -jnp.inf)


def sample_tokens(logits, keys, temperature, top_k, top_p, min_p):
  """logits [b, vocab] float32, keys [b] (one stream per row), params [b]. Returns int32 [b]."""
  greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)

  def draw(_):
    t = jnp.where(temperature > 0, temperature, 1.0)[:, None]
    scaled = logits / t
    needs_filter = jnp.any((top_k > 0) | (top_p < 1.0) | (min_p > 0.0))
    scaled = jax.lax.cond(needs_filter, lambda s: _filter_logits(s, top_k, top_p, min_p), lambda s: s, scaled)
    drawn = jax.vmap(lambda k, row: jax.random.categorical(k, row))(keys, scaled).astype(jnp.int32)
    return jnp.where(temperature > 0, drawn, greedy)

  # an all-greedy batch skips the sort and the draws entirely
  return jax.lax.cond(jnp.any(temperature > 0), draw, lambda _: greedy, None)


def row_keys(seeds, positions):
  """One key per row from that row's own seed and the position of the token being sampled."""
  return jax.vmap(lambda s, p: jax.random.fold_in(jax.random.key(s), p))(seeds, positions)
