"""FlashAttention-2: one public function, several implementations (see api.IMPLEMENTATIONS)."""

from pallas_kernels.flash_attention.api import (
    DEFAULT_FOR_BACKEND,
    IMPLEMENTATIONS,
    available_implementations,
    flash_attention,
)
from pallas_kernels.flash_attention.reference import attention_reference
from pallas_kernels.flash_attention.tiles import tile_visibility

__all__ = ["DEFAULT_FOR_BACKEND", "IMPLEMENTATIONS", "attention_reference", "available_implementations",
           "flash_attention", "tile_visibility"]
