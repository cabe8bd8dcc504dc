"""Public entry point of Hydragen-style shared-prefix decode attention, with an explicit implementation."""

from __future__ import annotations

import importlib

import jax.numpy as jnp

_PACKAGE = "pallas_kernels.shared_prefix_attention"
IMPLEMENTATIONS = {
    "reference": (f"{_PACKAGE}.reference", "shared_prefix_attention_reference"),
    "xla": (f"{_PACKAGE}.xla", "shared_prefix_attention"),
}


def _validate(q, prefix_k, prefix_v, suffix_k, suffix_v, suffix_lens):
  if q.ndim != 3:
    raise ValueError(f"q must be [batch, q_heads, head_dim] (one decode token per sequence), got {q.shape}")
  if prefix_k.ndim != 3 or prefix_v.shape != prefix_k.shape:
    raise ValueError(f"prefix_k/prefix_v must both be [prefix_len, kv_heads, head_dim], got {prefix_k.shape} "
                     f"and {prefix_v.shape}")
  if suffix_k.ndim != 4 or suffix_v.shape != suffix_k.shape:
    raise ValueError(f"suffix_k/suffix_v must both be [batch, max_suffix, kv_heads, head_dim], got "
                     f"{suffix_k.shape} and {suffix_v.shape}")
  batch, q_heads, d = q.shape
  kv_heads = prefix_k.shape[1]
  if prefix_k.shape[2] != d or suffix_k.shape[3] != d:
    raise ValueError(f"head_dim mismatch: q {d}, prefix_k {prefix_k.shape[2]}, suffix_k {suffix_k.shape[3]}")
  if suffix_k.shape[2] != kv_heads or q_heads % kv_heads:
    raise ValueError(f"q_heads ({q_heads}) must be a multiple of kv_heads (prefix {kv_heads}, suffix "
                     f"{suffix_k.shape[2]})")
  if suffix_k.shape[0] != batch or suffix_lens.shape != (batch,):
    raise ValueError(f"suffix_k batch {suffix_k.shape[0]} / suffix_lens shape {suffix_lens.shape} do not match "
                     f"q batch {batch}")
  if not (q.dtype == prefix_k.dtype == prefix_v.dtype == suffix_k.dtype == suffix_v.dtype):
    raise ValueError("q, prefix_k, prefix_v, suffix_k and suffix_v must share one dtype")
  if not jnp.issubdtype(suffix_lens.dtype, jnp.integer):
    raise ValueError(f"suffix_lens must be integer, got {suffix_lens.dtype}")


def shared_prefix_attention(q, prefix_k, prefix_v, suffix_k, suffix_v, suffix_lens, *, sm_scale=None,
                            return_lse=False, implementation=None):
  """Decode attention for a batch whose sequences share one prefix (Hydragen).

  q [batch, q_heads, d] (the newest token of each sequence); prefix_k/v [prefix_len, kv_heads, d], shared by
  every row; suffix_k/v [batch, max_suffix, kv_heads, d], each row's own tokens after the prefix, of which
  the first suffix_lens[b] are valid (the newest token included). Equals attention of each row over its
  prefix + suffix. Returns [batch, q_heads, d] in q's dtype (and the float32 lse [batch, q_heads]).
  implementation: "reference" or "xla" (None: "xla", the faster one on every backend measured so far).
  """
  _validate(q, prefix_k, prefix_v, suffix_k, suffix_v, suffix_lens)
  name = "xla" if implementation is None else implementation
  if name not in IMPLEMENTATIONS:
    raise ValueError(f"implementation={name!r} is not one of {sorted(IMPLEMENTATIONS)}")
  module, fn = IMPLEMENTATIONS[name]
  return getattr(importlib.import_module(module), fn)(q, prefix_k, prefix_v, suffix_k, suffix_v, suffix_lens,
                                                      sm_scale=sm_scale, return_lse=return_lse)
