"""H2O's dense teacher-forced reference: the model over a whole sequence at once, each layer choosing its kept
set query by query exactly as the engine's H2O policy does (h2o.py), for perplexity against a budget.

  logits = h2o_logits(model, tokens, prompt_len=512, budget=128, window=16)    # [N, vocab] float32

Exact, not an approximation: in teacher forcing a layer's queries and keys depend only on the layers below,
so its heavy-hitter set at step i depends only on its own scores of queries <= i, which one scan per layer
over the continuation computes. The rule (per layer and kv head, scores summed over the group's query heads):
  - prompt rows attend causally (prefill is dense); their attention mass accumulates;
  - at the end of the prompt, a prompt longer than the budget keeps the `window` most recent slots and the
    budget - window others with the most mass (device.h2o_select); the evicted slots' mass is dropped;
  - continuation row i sees the kept slots and itself, adds its attention to their mass, and then, while more
    than `budget` are kept, evicts the one with the least mass among those at positions <= i - window
    (lowest position on a tie, as the engine's argmin over position-ordered slots).
quant_dtype: keys and values as a pool of that dtype returns them (kv_quant.roundtrip, as reference.py).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from jaxinfer.engine import kv_quant


@struct.dataclass
class H2ODenseCache:
  prompt_len: int = struct.field(pytree_node=False, default=0)
  budget: int = struct.field(pytree_node=False, default=0)
  window: int = struct.field(pytree_node=False, default=1)
  quant_dtype: str | None = struct.field(pytree_node=False, default=None)

  def begin(self, positions, segment_ids):
    del positions, segment_ids
    return self

  def attend(self, layer, q, k, v, *, positions, segment_ids, sliding_window, implementation):
    del layer, positions, segment_ids, sliding_window, implementation
    _, n, heads, d = q.shape
    hkv = k.shape[2]
    g = heads // hkv
    kf, vf = k[0].astype(jnp.float32), v[0].astype(jnp.float32)
    if self.quant_dtype is not None:
      kf, vf = kv_quant.roundtrip(kf, self.quant_dtype), kv_quant.roundtrip(vf, self.quant_dtype)
    qf = q[0].astype(jnp.float32).reshape(n, hkv, g, d)
    s = jnp.einsum("qhgd,khd->hgqk", qf, kf) / np.sqrt(d)  # [hkv, g, N, N]
    probs = h2o_probs(s, self.prompt_len, self.budget, self.window)
    out = jnp.einsum("hgqk,khd->qhgd", probs, vf).reshape(1, n, heads, d).astype(q.dtype)
    return out, None

  def finish(self, layer_kvs, num_tokens):
    del layer_kvs, num_tokens
    return self


def _softmax(s, visible):
  m = jnp.max(jnp.where(visible, s, -jnp.inf), axis=-1, keepdims=True)
  e = jnp.where(visible, jnp.exp(s - m), 0.0)
  return e / e.sum(-1, keepdims=True)


def h2o_probs(s, prompt_len: int, budget: int, window: int):
  """Attention probabilities [H, G, N, N] of scores s [H, G, N, N] under H2O's kept sets (module docstring)."""
  h, _, n, _ = s.shape
  j = jnp.arange(n)
  causal = j[None, :] <= j[:, None]
  dense = _softmax(s, causal[None, None])
  mass = dense[:, :, :prompt_len].sum(axis=(1, 2))  # [H, N]
  kept = jnp.broadcast_to(j < prompt_len, (h, n))
  if prompt_len > budget:
    _, top = jax.lax.top_k(jnp.where(j < prompt_len - window, mass, -jnp.inf), budget - window)
    heavy = jnp.zeros((h, n), bool).at[jnp.arange(h)[:, None], top].set(True)
    kept = heavy | ((j >= prompt_len - window) & (j < prompt_len))
  mass = jnp.where(kept, mass, 0.0)

  def step(carry, i):
    kept, mass = carry
    kept = kept | (j == i)
    p = _softmax(s[:, :, i], kept[:, None])  # [H, G, N]
    mass = mass + p.sum(1)
    old = kept & (j <= i - window)
    victim = jnp.argmin(jnp.where(old, mass, jnp.inf), axis=-1)
    out = (kept.sum(-1) > budget) & old.any(-1)
    gone = out[:, None] & (j == victim[:, None])
    return (kept & ~gone, jnp.where(gone, 0.0, mass)), p

  if prompt_len >= n:
    return dense
  _, rows = jax.lax.scan(step, (kept, mass), jnp.arange(prompt_len, n))  # [N - P, H, G, N]
  return jnp.concatenate([dense[:, :, :prompt_len], rows.transpose(1, 2, 0, 3)], axis=2)


_JIT: dict = {}


def h2o_logits(model, tokens, *, prompt_len: int, budget: int, window: int, quant_dtype=None) -> np.ndarray:
  """[N, vocab] float32 logits of every position of tokens under H2O (prompt: the first prompt_len tokens)."""
  from flax import nnx

  if not 0 < window < budget:
    raise ValueError(f"h2o_logits: window must be in (0, budget={budget}), got {window}")
  graphdef, state = nnx.split(model)
  key = (graphdef, prompt_len, budget, window, quant_dtype)
  if key not in _JIT:
    def run(state, tokens):
      cache = H2ODenseCache(prompt_len=prompt_len, budget=budget, window=window, quant_dtype=quant_dtype)
      ids = tokens[None]
      pos = jnp.arange(ids.shape[1], dtype=jnp.int32)[None]
      return nnx.merge(graphdef, state)(ids, pos, jnp.zeros_like(ids), cache)[0][0]
    _JIT[key] = jax.jit(run)
  return np.asarray(_JIT[key](state, jnp.asarray(tokens, jnp.int32)), np.float32)
