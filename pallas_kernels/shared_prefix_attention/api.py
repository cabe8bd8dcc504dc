"""Public entry point of Hydragen-style shared-prefix decode attention, with an explicit implementation."""

from __future__ import annotations

import jax.numpy as jnp

from pallas_kernels import validation as V
from pallas_kernels.op import Op

_PACKAGE = "pallas_kernels.shared_prefix_attention"

# name -> module implementing both entries (imported on first use). There is no Pallas kernel: Hydragen's gain
# is the batched prefix matmul, which XLA already emits.
IMPLEMENTATIONS: dict[str, str] = {
    "reference": f"{_PACKAGE}.reference",
    "xla": f"{_PACKAGE}.xla",
}
# the paged, grouped prefix part (what the engine calls) has the same implementations
PAGED_IMPLEMENTATIONS = IMPLEMENTATIONS

# backend -> implementation picked by implementation=None: "xla", the faster one on every backend measured.
DEFAULT_FOR_BACKEND: dict[str, tuple[str, ...]] = {"gpu": ("xla",), "tpu": ("xla",), "cpu": ("xla",)}

OP = Op("shared_prefix_attention", IMPLEMENTATIONS, DEFAULT_FOR_BACKEND,
        entries=("shared_prefix_attention", "paged_prefix_attention"))


def available_implementations(interpret=False) -> list[str]:
  """Names of the implementations that can run on this machine."""
  return OP.available(interpret)


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
  implementation: "reference" or "xla" (None: "xla", the faster one on every backend measured so far;
  the choice is logged once).
  """
  _validate(q, prefix_k, prefix_v, suffix_k, suffix_v, suffix_lens)
  V.check_options(sm_scale=sm_scale)
  fn = OP.function(implementation)
  return fn(q, prefix_k, prefix_v, suffix_k, suffix_v, suffix_lens, sm_scale=sm_scale, return_lse=return_lse)


def _validate_paged(q, k_pages, v_pages, prefix_page_table, prefix_lens, q_positions, sliding_window):
  if q.ndim != 4:
    raise ValueError(f"q must be [groups, rows, q_heads, head_dim], got shape {q.shape}")
  if k_pages.ndim != 4 or v_pages.shape != k_pages.shape:
    raise ValueError(f"k_pages/v_pages must both be [num_pages, page_size, kv_heads, head_dim], got "
                     f"{k_pages.shape} and {v_pages.shape}")
  groups, rows, q_heads, d = q.shape
  if k_pages.shape[3] != d:
    raise ValueError(f"head_dim mismatch: q {d}, k_pages {k_pages.shape[3]}")
  if q_heads % k_pages.shape[2]:
    raise ValueError(f"q_heads ({q_heads}) must be a multiple of kv_heads ({k_pages.shape[2]})")
  if not (q.dtype == k_pages.dtype == v_pages.dtype):
    raise ValueError(f"q, k_pages and v_pages must share one dtype, got {q.dtype}, {k_pages.dtype}, {v_pages.dtype}")
  if prefix_page_table.ndim != 2 or prefix_page_table.shape[0] != groups or prefix_page_table.shape[1] < 1:
    raise ValueError(f"prefix_page_table must be [groups={groups}, max_prefix_pages >= 1], got "
                     f"{prefix_page_table.shape}")
  if not jnp.issubdtype(prefix_page_table.dtype, jnp.integer):
    raise ValueError(f"prefix_page_table must be integer, got {prefix_page_table.dtype}")
  if prefix_lens.shape != (groups,) or not jnp.issubdtype(prefix_lens.dtype, jnp.integer):
    raise ValueError(f"prefix_lens must be an integer array of shape ({groups},), got {prefix_lens.dtype} "
                     f"{prefix_lens.shape}")
  V.check_positive_int("sliding_window", sliding_window)
  if sliding_window is not None:
    if q_positions is None or q_positions.shape != (groups, rows):
      raise ValueError(f"sliding_window needs q_positions of shape ({groups}, {rows}), got "
                       f"{None if q_positions is None else q_positions.shape}")


def paged_prefix_attention(q, k_pages, v_pages, prefix_page_table, prefix_lens, *, q_positions=None,
                           sliding_window=None, sm_scale=None, implementation=None):
  """Hydragen's prefix part over a paged KV pool, for several groups of queries that each share a prefix.

  q [groups, rows, q_heads, d]: the query rows of group g (rows that are padding may hold anything: their
  results are simply not used). prefix_page_table int32 [groups, max_prefix_pages]: the pages of group g's
  prefix in order; prefix_lens int32 [groups]: its length in tokens (0: an unused group, out 0 / lse -inf).
  Every query is assumed to sit after its group's prefix (so all of the prefix is causally visible); with
  `sliding_window`, q_positions int32 [groups, rows] (absolute positions) hide prefix key j from a query at
  position p when p - j >= sliding_window.

  Returns (out float32 [groups, rows, q_heads, d] normalised over the prefix keys, lse float32
  [groups, rows, q_heads]), ready for merge_partials with the attention over each sequence's own suffix.
  implementation: "reference" or "xla" (None: "xla").
  """
  _validate_paged(q, k_pages, v_pages, prefix_page_table, prefix_lens, q_positions, sliding_window)
  V.check_options(sm_scale=sm_scale)
  fn = OP.function(implementation, entry="paged_prefix_attention")
  return fn(q, k_pages, v_pages, prefix_page_table, prefix_lens, q_positions=q_positions,
            sliding_window=sliding_window, sm_scale=sm_scale)
