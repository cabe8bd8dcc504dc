"""cuDNN flash attention through `jax.nn.dot_product_attention(implementation="cudnn")` ("cudnn").

A baseline for benchmarks and an option on NVIDIA GPUs for the masks cuDNN can express: causal or not on
default positions (cuDNN masks follow array indices, top-left aligned), and a causal sliding window
(local_window_size=(window - 1, 0)). Anything else raises ValueError naming the argument: explicit positions
(chunked prefill, striped layouts), packed segment ids, logits soft cap, a non-causal window, float32 inputs.
There is no interpret mode: on a machine without a CUDA GPU it raises RuntimeError.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels.flash_attention import _common as C

NAME = "cudnn"


def unavailable_reason(interpret) -> str | None:
  del interpret  # cuDNN has no interpret mode
  backend = jax.default_backend()
  if backend != "gpu":
    return (f"implementation={NAME!r} needs an NVIDIA GPU with cuDNN (the default backend is {backend!r}); "
            "it has no interpret mode")
  dev = jax.devices()[0]
  if "rocm" in str(getattr(dev.client, "platform_version", "")).lower():
    return f"implementation={NAME!r} needs an NVIDIA GPU (this GPU backend is ROCm)"
  return None


def unsupported_arguments(q, *, causal, q_positions, kv_positions, q_segment_ids, sliding_window,
                          logits_soft_cap) -> list[str]:
  """Names (with reasons) of the arguments cuDNN cannot express; empty when it can run this call."""
  bad = []
  if q_positions is not None or kv_positions is not None:
    bad.append("q_positions/kv_positions (cuDNN masks follow array indices; only the default arange positions)")
  if q_segment_ids is not None:
    bad.append("q_segment_ids/kv_segment_ids (no packed-segment mask in cuDNN flash attention)")
  if logits_soft_cap is not None:
    bad.append("logits_soft_cap (not supported by cuDNN flash attention)")
  if sliding_window is not None and not causal:
    bad.append("sliding_window with causal=False (cuDNN windows are causal only)")
  if q.dtype not in (jnp.bfloat16, jnp.float16):
    bad.append(f"dtype {q.dtype} (cuDNN flash attention takes float16/bfloat16)")
  return bad


def flash_attention(q, k, v, *, causal=True, sm_scale=None, q_positions=None, kv_positions=None,
                    q_segment_ids=None, kv_segment_ids=None, sliding_window=None, logits_soft_cap=None,
                    return_lse=False, interpret=False):
  """Same contract as `pallas_kernels.flash_attention`, for the subset of masks listed in the module doc."""
  del interpret
  inp = C.prepare(q, k, v, causal=causal, sm_scale=sm_scale, q_positions=q_positions,
                  kv_positions=kv_positions, q_segment_ids=q_segment_ids, kv_segment_ids=kv_segment_ids,
                  sliding_window=sliding_window, logits_soft_cap=logits_soft_cap)
  bad = unsupported_arguments(q, causal=causal, q_positions=q_positions, kv_positions=kv_positions,
                              q_segment_ids=q_segment_ids, sliding_window=sliding_window,
                              logits_soft_cap=logits_soft_cap)
  if bad:
    raise ValueError(f"implementation={NAME!r} cannot express: " + "; ".join(bad)
                     + ". Use implementation='pallas_gpu' or 'xla'.")
  reason = unavailable_reason(False)
  if reason:
    raise RuntimeError(reason)
  window = None if sliding_window is None else (sliding_window - 1, 0)
  out = jax.nn.dot_product_attention(q, k, v, scale=inp.params.sm_scale, is_causal=causal,
                                     local_window_size=window, implementation="cudnn",
                                     return_residual=return_lse)
  if not return_lse:
    return out
  out, lse = out  # jax.nn returns the log-sum-exp as [batch, q_len, q_heads] in the output dtype
  return out, jnp.swapaxes(lse, 1, 2).astype(jnp.float32)
