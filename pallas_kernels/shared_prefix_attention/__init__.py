from pallas_kernels.shared_prefix_attention.api import IMPLEMENTATIONS, shared_prefix_attention
from pallas_kernels.shared_prefix_attention.merge import merge_partials

__all__ = ["IMPLEMENTATIONS", "merge_partials", "shared_prefix_attention"]
