"""Attention and matmul kernels: one folder per op, each with a reference and fast implementations."""

from pallas_kernels.flash_attention import flash_attention, tile_visibility

__all__ = ["flash_attention", "tile_visibility"]

from pallas_kernels.shared_prefix_attention import shared_prefix_attention  # noqa: E402

__all__ += ["shared_prefix_attention"]

from pallas_kernels.decode_attention import decode_attention  # noqa: E402
from pallas_kernels.paged_attention import paged_attention, ragged_paged_attention  # noqa: E402

__all__ += ["decode_attention", "paged_attention", "ragged_paged_attention"]

from pallas_kernels.grouped_matmul import grouped_matmul  # noqa: E402

__all__ += ["grouped_matmul"]
