"""Attention and matmul kernels: one folder per op, each with a reference and fast implementations."""

from pallas_kernels.flash_attention import flash_attention, tile_visibility

__all__ = ["flash_attention", "tile_visibility"]

from pallas_kernels.shared_prefix_attention import shared_prefix_attention  # noqa: E402

__all__ += ["shared_prefix_attention"]
