"""Pieces shared by the decode-time attention ops (decode_attention, paged_attention, ragged_paged_attention,
shared_prefix_attention): the static score parameters, the dense masked core of their references, the
split-K heuristic. A neutral module: it imports no op folder except flash_attention's shape and soft-cap
helpers, so the decode-time folders depend on it and never on each other in a cycle."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

# Reused from flash_attention (by import, not copied): ceil-div, padding and the soft-cap transform.
from pallas_kernels.flash_attention._common import cdiv, pad_axis, round_up, soft_cap  # noqa: F401
# The shared argument checks, under the names the decode-time kernels call them by.
from pallas_kernels.validation import (check_array, check_block, check_options, check_qkv,  # noqa: F401
                                       check_shape)

# Number of parallel work items a GPU wants before split-K stops paying (about 2 waves on a 132-SM H100).
GPU_TARGET_PROGRAMS = 264


@dataclasses.dataclass(frozen=True)
class ScoreParams:
  """Static (hashable) score transform and window; `logits_soft_cap` is the name flash_attention's
  `soft_cap` helper reads."""
  sm_scale: float
  sliding_window: int | None
  logits_soft_cap: float | None


def score_params(head_dim: int, sm_scale, sliding_window, logits_soft_cap) -> ScoreParams:
  return ScoreParams(sm_scale=float(head_dim ** -0.5 if sm_scale is None else sm_scale),
                     sliding_window=None if sliding_window is None else int(sliding_window),
                     logits_soft_cap=None if logits_soft_cap is None else float(logits_soft_cap))


def int32(x):
  return jnp.asarray(x, jnp.int32)


def default_num_splits(parallel_items: int, max_blocks: int, *, target: int = GPU_TARGET_PROGRAMS,
                       min_blocks_per_split: int = 2) -> int:
  """FlashDecoding's heuristic: split the keys until batch x heads x splits fills the device, keeping at least
  `min_blocks_per_split` key blocks per split."""
  want = cdiv(target, max(1, parallel_items))
  cap = max(1, max_blocks // min_blocks_per_split)
  return int(max(1, min(want, cap)))


# ----------------------------------------------------------------------------- the references' dense core


def masked_attention(q, k, v, mask, params: ScoreParams):
  """q [n, m, q_heads, d]; k, v [n, L, kv_heads, d]; mask bool [n, m, L] -> (out float32 [n, m, q_heads, d],
  lse float32 [n, m, q_heads]). Materialises every score in float32; keys no query may see have their values
  zeroed too, so whatever an unused cache slot holds (even NaN) never reaches the output. Rows with no
  visible key give zeros and lse -inf."""
  n, m, hq, d = q.shape
  hkv = k.shape[2]
  g = hq // hkv
  key_used = jnp.any(mask, axis=1)[:, :, None, None]  # [n, L, 1, 1]
  kf = jnp.where(key_used, k.astype(jnp.float32), 0.0)
  vf = jnp.where(key_used, v.astype(jnp.float32), 0.0)
  qf = q.astype(jnp.float32).reshape(n, m, hkv, g, d)
  s = jnp.einsum("nmhgd,nlhd->nmhgl", qf, kf, precision=jax.lax.Precision.HIGHEST) * params.sm_scale
  s, _ = soft_cap(s, params)
  vis = mask[:, :, None, None, :]
  s = jnp.where(vis, s, -jnp.inf)
  lse = jax.nn.logsumexp(s, axis=-1)
  p = jnp.where(vis, jnp.exp(s - jnp.where(jnp.isfinite(lse), lse, 0.0)[..., None]), 0.0)
  out = jnp.einsum("nmhgl,nlhd->nmhgd", p, vf, precision=jax.lax.Precision.HIGHEST)
  return out.reshape(n, m, hq, d), lse.reshape(n, m, hq)


def decode_mask(kv_lens, max_kv_len: int, sliding_window):
  """bool [batch, max_kv_len]: key j is visible to the new token (position kv_len - 1)."""
  j = jnp.arange(max_kv_len, dtype=jnp.int32)[None, :]
  kv_lens = jnp.clip(int32(kv_lens), 0, max_kv_len)[:, None]
  ok = j < kv_lens
  if sliding_window is not None:
    ok = ok & (kv_lens - 1 - j < sliding_window)
  return ok
