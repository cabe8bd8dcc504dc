"""FlashDecoding-style split-K decode attention over a contiguous KV cache (see api.decode_attention)."""

from pallas_kernels.decode_attention._common import merge_partials
from pallas_kernels.decode_attention.api import (
    DEFAULT_FOR_BACKEND,
    IMPLEMENTATIONS,
    available_implementations,
    decode_attention,
)

__all__ = ["DEFAULT_FOR_BACKEND", "IMPLEMENTATIONS", "available_implementations", "decode_attention",
           "merge_partials"]
