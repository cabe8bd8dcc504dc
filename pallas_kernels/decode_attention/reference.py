"""Plain-jnp decode attention in float32: the obviously-correct baseline the fast paths are checked against.

`masked_attention` is the one dense core shared with the paged references: it materialises every score and
masks; keys that no query may see have their values zeroed too, so whatever an unused cache slot holds
(even NaN) never reaches the output.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels.decode_attention import _common as C

NAME = "reference"


def unavailable_reason(interpret) -> str | None:
  del interpret
  return None


def masked_attention(q, k, v, mask, params: C.ScoreParams):
  """q [n, m, q_heads, d]; k, v [n, L, kv_heads, d]; mask bool [n, m, L] -> (out float32 [n, m, q_heads, d],
  lse float32 [n, m, q_heads]). Rows with no visible key give zeros and lse -inf."""
  n, m, hq, d = q.shape
  hkv = k.shape[2]
  g = hq // hkv
  key_used = jnp.any(mask, axis=1)[:, :, None, None]  # [n, L, 1, 1]
  kf = jnp.where(key_used, k.astype(jnp.float32), 0.0)
  vf = jnp.where(key_used, v.astype(jnp.float32), 0.0)
  qf = q.astype(jnp.float32).reshape(n, m, hkv, g, d)
  s = jnp.einsum("nmhgd,nlhd->nmhgl", qf, kf, precision=jax.lax.Precision.HIGHEST) * params.sm_scale
  s, _ = C.soft_cap(s, params)
  vis = mask[:, :, None, None, :]
  s = jnp.where(vis, s, -jnp.inf)
  lse = jax.nn.logsumexp(s, axis=-1)
  p = jnp.where(vis, jnp.exp(s - jnp.where(jnp.isfinite(lse), lse, 0.0)[..., None]), 0.0)
  out = jnp.einsum("nmhgl,nlhd->nmhgd", p, vf, precision=jax.lax.Precision.HIGHEST)
  return out.reshape(n, m, hq, d), lse.reshape(n, m, hq)


def decode_mask(kv_lens, max_kv_len: int, sliding_window):
  """bool [batch, max_kv_len]: key j is visible to the new token (position kv_len - 1)."""
  j = jnp.arange(max_kv_len, dtype=jnp.int32)[None, :]
  kv_lens = jnp.clip(C.int32(kv_lens), 0, max_kv_len)[:, None]
  ok = j < kv_lens
  if sliding_window is not None:
    ok = ok & (kv_lens - 1 - j < sliding_window)
  return ok


def decode_attention(q, k, v, kv_lens, *, sm_scale=None, sliding_window=None, logits_soft_cap=None,
                     num_splits=None, return_lse=False, interpret=False):
  """Same contract as `pallas_kernels.decode_attention`; num_splits is accepted and ignored (one dense
  softmax)."""
  del num_splits, interpret
  params = C.score_params(q.shape[-1], sm_scale, sliding_window, logits_soft_cap)
  mask = decode_mask(kv_lens, k.shape[1], params.sliding_window)
  out, lse = masked_attention(q[:, None], k, v, mask[:, None, :], params)
  out = out[:, 0].astype(q.dtype)
  return (out, lse[:, 0]) if return_lse else out
