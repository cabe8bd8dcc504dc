"""Public entry points `paged_attention` and `ragged_paged_attention` (implementation=...) and their op table
(pallas_kernels.op.Op, one table for both entries).

Each implementation module exposes both functions (same keywords plus its own block-size keywords, reachable
by calling the module directly) and `unavailable_reason(interpret)`. Adding one is an entry in the modules
table of IMPLEMENTATIONS (see pallas_kernels.op).
"""

from __future__ import annotations

from pallas_kernels.op import PALLAS_DEFAULTS, Op, implementation_table
from pallas_kernels.paged_attention import _common as P

_PACKAGE = "pallas_kernels.paged_attention"

# name -> module implementing both entries (imported on first use): reference.py, xla.py, gpu.py, tpu.py.
IMPLEMENTATIONS: dict[str, str] = implementation_table(_PACKAGE)

# backend -> implementations picked by implementation=None, in order of preference (first available wins).
DEFAULT_FOR_BACKEND: dict[str, tuple[str, ...]] = dict(PALLAS_DEFAULTS)

OP = Op("paged_attention", IMPLEMENTATIONS, DEFAULT_FOR_BACKEND,
        entries=("paged_attention", "ragged_paged_attention"))


def available_implementations(interpret=False) -> list[str]:
  """Names of the implementations that can run on this machine (with the given interpret setting)."""
  return OP.available(interpret)


def paged_attention(q, k_pages, v_pages, page_table, kv_lens, *, sm_scale=None, sliding_window=None,
                    logits_soft_cap=None, num_splits=None, implementation=None, interpret=False, k_scales=None,
                    v_scales=None):
  """Decode attention (one new token per sequence) reading the KV cache through a page table.

  Args:
    q: [batch, q_heads, head_dim]; the token of row b has position kv_lens[b] - 1.
    k_pages, v_pages: [num_pages, page_size, kv_heads, head_dim], the page pool (q's dtype); q_heads a
      multiple of kv_heads.
    page_table: int32 [batch, pages_per_seq]: position p of sequence b lives in page page_table[b, p //
      page_size] at slot p % page_size. Entries past the last needed page are never read (may hold anything).
    kv_lens: int32 [batch], number of cached tokens (clipped to [0, pages_per_seq * page_size]).
    sm_scale, sliding_window, logits_soft_cap: as in decode_attention (window: kv_len - 1 - p < window).
    num_splits: split-K ranges per sequence merged by log-sum-exp (None: per-implementation heuristic).
    implementation: one of IMPLEMENTATIONS or None (gpu: pallas_gpu, tpu: pallas_tpu, cpu: xla; logged once).
    interpret: run Pallas kernels in interpret mode (CPU).
    k_scales, v_scales: float32 scales of a quantized pool (k_pages/v_pages int8 or float8_e4m3fn), per token
      [num_pages, page_size, kv_heads, 1] or per channel [num_pages / r, 1, kv_heads, head_dim] (see
      _quant.py); every implementation dequantizes only the tiles it loads. None: a float pool in q's dtype.

  Returns:
    [batch, q_heads, head_dim] in q's dtype; zeros for kv_len 0. Pages and slots that are not visible may
    hold anything (even NaN).
  """
  P.validate_paged(q, k_pages, v_pages, page_table, kv_lens, sm_scale=sm_scale, sliding_window=sliding_window,
                   logits_soft_cap=logits_soft_cap, num_splits=num_splits, k_scales=k_scales, v_scales=v_scales)
  fn = OP.function(implementation, interpret)
  quant = {} if k_scales is None else dict(k_scales=k_scales, v_scales=v_scales)
  return fn(q, k_pages, v_pages, page_table, kv_lens, sm_scale=sm_scale, sliding_window=sliding_window,
            logits_soft_cap=logits_soft_cap, num_splits=num_splits, interpret=interpret, **quant)


def ragged_paged_attention(q, k_pages, v_pages, page_table, kv_lens, cu_q_lens, num_seqs, *, sm_scale=None,
                           sliding_window=None, logits_soft_cap=None, return_lse=False, implementation=None,
                           interpret=False, k_scales=None, v_scales=None):
  """One launch for a serving step's mix of prefill chunks and decode tokens over a paged KV cache.

  Args:
    q: [max_tokens, q_heads, head_dim]: the new query tokens of sequences 0 .. num_seqs-1 concatenated;
      sequence s owns rows cu_q_lens[s] : cu_q_lens[s+1]; rows from cu_q_lens[num_seqs] on are padding.
    k_pages, v_pages: [num_pages, page_size, kv_heads, head_dim], already holding this step's new tokens.
    page_table: int32 [max_seqs, pages_per_seq]; kv_lens: int32 [max_seqs], cached tokens of each sequence
      INCLUDING this step's (clipped to the capacity pages_per_seq * page_size).
    cu_q_lens: int32 [max_seqs + 1], nondecreasing, cu_q_lens[0] = 0.
    num_seqs: int or int32 scalar array (dynamic): sequences in use; entries beyond are ignored.
    Row i of sequence s has position kv_lens[s] - q_len_s + i and sees keys at positions <= its own (causal),
    and with sliding_window only those with position > its own - sliding_window.
    sm_scale, logits_soft_cap: as in decode_attention.
    return_lse: also return the float32 log-sum-exp [max_tokens, q_heads] (for merging with other partials,
      e.g. a shared prefix).
    implementation, interpret, k_scales, v_scales: as in paged_attention.

  Returns:
    [max_tokens, q_heads, head_dim] in q's dtype (and lse); padding rows and rows that see no key get zeros
    (lse -inf). Static shapes only depend on the argument shapes, so one compilation serves every mix of
    lengths within a bucket.
  """
  P.validate_ragged(q, k_pages, v_pages, page_table, kv_lens, cu_q_lens, num_seqs, sm_scale=sm_scale,
                    sliding_window=sliding_window, logits_soft_cap=logits_soft_cap, k_scales=k_scales,
                    v_scales=v_scales)
  fn = OP.function(implementation, interpret, entry="ragged_paged_attention")
  quant = {} if k_scales is None else dict(k_scales=k_scales, v_scales=v_scales)
  return fn(q, k_pages, v_pages, page_table, kv_lens, cu_q_lens, num_seqs, sm_scale=sm_scale,
            sliding_window=sliding_window, logits_soft_cap=logits_soft_cap, return_lse=return_lse,
            interpret=interpret, **quant)
