"""Attention and matmul kernels: one folder per op, each with a reference and fast implementations."""

from pallas_kernels.flash_attention import flash_attention, tile_visibility

__all__ = ["flash_attention", "tile_visibility"]
