from pallas_kernels.flash_attention.api import flash_attention

__all__ = ["flash_attention"]
