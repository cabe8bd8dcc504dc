"""The distribution the engine's sampler draws each row from, as probabilities (for speculative sampling).

Same filters and the same temperature scaling as jaxinfer.generation.sampling.sample_tokens, so a token the
engine samples with a row's key is distributed exactly as this row of probabilities; greedy rows are the
one-hot of their argmax."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxinfer.generation.sampling import _filter_logits  # the sampler's own filter: one definition of top-k/p


def token_probs(logits, temperature, top_k, top_p, min_p):
  """logits [b, vocab] float32, params [b] -> [b, vocab] float32 probabilities."""
  logits = logits.astype(jnp.float32)
  t = jnp.where(temperature > 0, temperature, 1.0)[:, None]
  scaled = _filter_logits(logits / t, top_k, top_p, min_p)
  probs = jax.nn.softmax(scaled, axis=-1)
  greedy = jax.nn.one_hot(jnp.argmax(logits, axis=-1), logits.shape[-1], dtype=jnp.float32)
  return jnp.where((temperature > 0)[:, None], probs, greedy)
