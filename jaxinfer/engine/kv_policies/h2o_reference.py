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
  prompt_len: jax.Array | int = 0
  budget: jax.Array | int = 0
  window: jax.Array | int = 1
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


def h2o_probs(s, prompt_len, budget, window):
  """Attention probabilities [H, G, N, N] of scores s [H, G, N, N] under H2O's kept sets (module docstring).
  prompt_len, budget and window may be traced (one compiled program per length)."""
  h, _, n, _ = s.shape
  j = jnp.arange(n)
  causal = j[None, :] <= j[:, None]
  dense = _softmax(s, causal[None, None])
  mass = (dense.sum(1) * (j < prompt_len)[None, :, None]).sum(1)  # [H, N]: the prompt rows' attention mass
  # end of prompt: a prompt longer than the budget keeps its window + the budget - window heaviest before it
  cand = j < prompt_len - window
  heavy_mass = jnp.where(cand, mass, -jnp.inf)
  order = jnp.argsort(-heavy_mass, axis=-1, stable=True)  # heaviest first, lowest position on ties
  rank = jnp.zeros((h, n), jnp.int32).at[jnp.arange(h)[:, None], order].set(jnp.arange(n, dtype=jnp.int32))
  compact = (cand & (rank < budget - window)) | ((j >= prompt_len - window) & (j < prompt_len))
  kept = jnp.where(prompt_len > budget, compact, j < prompt_len)
  mass = jnp.where(kept, mass, 0.0)

  def step(carry, i):
    kept, mass = carry
    active = i >= prompt_len  # prompt rows: dense, nothing changes
    kept_i = kept | (j == i)
    p = _softmax(s[:, :, i], kept_i[:, None])  # [H, G, N]
    new_mass = mass + p.sum(1)
    old = kept_i & (j <= i - window)
    victim = jnp.argmin(jnp.where(old, new_mass, jnp.inf), axis=-1)
    out = (kept_i.sum(-1) > budget) & old.any(-1)
    gone = out[:, None] & (j == victim[:, None])
    kept = jnp.where(active, kept_i & ~gone, kept)
    mass = jnp.where(active, jnp.where(gone, 0.0, new_mass), mass)
    return (kept, mass), jnp.where(active, p, dense[:, :, i])

  _, rows = jax.lax.scan(step, (kept, mass), jnp.arange(n))  # [N, H, G, N]
  return rows.transpose(1, 2, 0, 3)


_JIT: dict = {}


def h2o_logits(model, tokens, *, prompt_len: int, budget: int, window: int, quant_dtype=None) -> np.ndarray:
  """[N, vocab] float32 logits of every position of tokens under H2O (prompt: the first prompt_len tokens)."""
  from flax import nnx

  if not 0 < window < budget:
    raise ValueError(f"h2o_logits: window must be in (0, budget={budget}), got {window}")
  graphdef, state = nnx.split(model)
  key = (graphdef, quant_dtype)
  if key not in _JIT:  # one compile per model and length: experiments call it for many budgets
    def run(state, tokens, prompt_len, budget, window):
      cache = H2ODenseCache(prompt_len=prompt_len, budget=budget, window=window, quant_dtype=quant_dtype)
      ids = tokens[None]
      pos = jnp.arange(ids.shape[1], dtype=jnp.int32)[None]
      return nnx.merge(graphdef, state)(ids, pos, jnp.zeros_like(ids), cache)[0][0]
    _JIT[key] = jax.jit(run)
  out = _JIT[key](state, jnp.asarray(tokens, jnp.int32), jnp.int32(prompt_len), jnp.int32(budget), jnp.int32(window))
  return np.asarray(out, np.float32)
