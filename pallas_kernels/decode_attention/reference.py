"""Plain-jnp decode attention in float32: the obviously-correct baseline the fast paths are checked against
(the dense core `decode_common.masked_attention`, shared with the paged references)."""

from __future__ import annotations

import jax.numpy as jnp

from pallas_kernels import decode_common as C
from pallas_kernels.decode_common import decode_mask, masked_attention  # noqa: F401 (re-exported)
from pallas_kernels.op import always_available

NAME = "reference"


unavailable_reason = always_available


def decode_attention(q, k, v, kv_lens, *, sm_scale=None, sliding_window=None, logits_soft_cap=None,
                     num_splits=None, return_lse=False, interpret=False, k_scales=None, v_scales=None):
  """Same contract as `pallas_kernels.decode_attention`; num_splits is accepted and ignored (one dense
  softmax). A quantized cache is dequantized in float32 first (obviously correct, not memory-lean)."""
  del num_splits, interpret
  if k_scales is not None:
    k, v = k.astype(jnp.float32) * k_scales, v.astype(jnp.float32) * v_scales
  params = C.score_params(q.shape[-1], sm_scale, sliding_window, logits_soft_cap)
  mask = decode_mask(kv_lens, k.shape[1], params.sliding_window)
  out, lse = masked_attention(q[:, None], k, v, mask[:, None, :], params)
  out = out[:, 0].astype(q.dtype)
  return (out, lse[:, 0]) if return_lse else out
