"""Public entry point (placeholder being replaced by the full dispatcher of issue 3)."""

from pallas_kernels.flash_attention.reference import attention_reference


def flash_attention(q, k, v, *, causal=True, sm_scale=None, q_positions=None, kv_positions=None,
                    q_segment_ids=None, kv_segment_ids=None, sliding_window=None, logits_soft_cap=None,
                    return_lse=False, implementation=None, interpret=False):
  if implementation not in (None, "reference", "xla"):
    raise ValueError(f"implementation={implementation!r} is not available yet")
  return attention_reference(q, k, v, causal=causal, sm_scale=sm_scale, q_positions=q_positions,
                             kv_positions=kv_positions, q_segment_ids=q_segment_ids,
                             kv_segment_ids=kv_segment_ids, sliding_window=sliding_window,
                             logits_soft_cap=logits_soft_cap, return_lse=return_lse)
