"""Public entry point of Hydragen-style shared-prefix decode attention, with an explicit implementation."""

from __future__ import annotations

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
  V.check_array(q, "q", 3, "[batch, q_heads, head_dim] (one decode token per sequence)", floating=True)
  V.check_array(prefix_k, "prefix_k", 3, "[prefix_len, kv_heads, head_dim]", floating=True)
  V.check_qkv(q, prefix_k, prefix_v, k_name="prefix_k", v_name="prefix_v")
  V.check_array(suffix_k, "suffix_k", 4, "[batch, max_suffix, kv_heads, head_dim]", floating=True)
  V.check_qkv(q, suffix_k, suffix_v, k_name="suffix_k", v_name="suffix_v")
  batch = q.shape[0]
  if suffix_k.shape[2] != prefix_k.shape[1]:
    raise ValueError(f"suffix_k kv_heads {suffix_k.shape[2]} does not match prefix_k kv_heads {prefix_k.shape[1]}")
  if suffix_k.shape[0] != batch:
    raise ValueError(f"suffix_k batch {suffix_k.shape[0]} does not match q batch {batch}")
  V.check_array(suffix_lens, "suffix_lens", 1, "[batch]", integer=True)
  V.check_shape(suffix_lens, "suffix_lens", (batch,), "[batch]")


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
  V.check_array(q, "q", 4, "[groups, rows, q_heads, head_dim]", floating=True)
  V.check_array(k_pages, "k_pages", 4, "[num_pages, page_size, kv_heads, head_dim]", floating=True)
  V.check_qkv(q, k_pages, v_pages, k_name="k_pages", v_name="v_pages")
  groups, rows = q.shape[:2]
  V.check_array(prefix_page_table, "prefix_page_table", 2, "[groups, max_prefix_pages]", integer=True)
  if prefix_page_table.shape[0] != groups or prefix_page_table.shape[1] < 1:
    raise ValueError(f"prefix_page_table must be [groups={groups}, max_prefix_pages >= 1], got "
                     f"{tuple(prefix_page_table.shape)}")
  V.check_array(prefix_lens, "prefix_lens", 1, "[groups]", integer=True)
  V.check_shape(prefix_lens, "prefix_lens", (groups,), "[groups]")
  V.check_positive_int("sliding_window", sliding_window)
  if sliding_window is not None:
    V.check_int_array(q_positions, "q_positions", (groups, rows), "[groups, rows] (needed by sliding_window)")
    if q_positions is None:
      raise ValueError(f"sliding_window needs q_positions of shape ({groups}, {rows}), got None")


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
