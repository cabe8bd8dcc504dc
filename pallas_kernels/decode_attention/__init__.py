"""FlashDecoding-style split-K decode attention over a contiguous KV cache (see api.decode_attention)."""

from pallas_kernels.decode_attention.api import (
    DEFAULT_FOR_BACKEND,
    IMPLEMENTATIONS,
    available_implementations,
    decode_attention,
)
from pallas_kernels.lse import merge_partials  # split-K partials are merged by log-sum-exp

__all__ = ["DEFAULT_FOR_BACKEND", "IMPLEMENTATIONS", "available_implementations", "decode_attention",
           "merge_partials"]
