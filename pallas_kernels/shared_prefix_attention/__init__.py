from pallas_kernels.shared_prefix_attention.api import (IMPLEMENTATIONS, PAGED_IMPLEMENTATIONS,
                                                       paged_prefix_attention, shared_prefix_attention)
from pallas_kernels.shared_prefix_attention.merge import merge_partials

__all__ = ["IMPLEMENTATIONS", "PAGED_IMPLEMENTATIONS", "merge_partials", "paged_prefix_attention",
           "shared_prefix_attention"]
