"""Hydragen shared-prefix decode attention (see api.py); `merge_partials` combines a prefix part with a suffix
part by log-sum-exp (pallas_kernels.lse.merge_pair)."""

from pallas_kernels.lse import merge_pair as merge_partials
from pallas_kernels.shared_prefix_attention.api import (IMPLEMENTATIONS, OP, PAGED_IMPLEMENTATIONS,
                                                       available_implementations, paged_prefix_attention,
                                                       shared_prefix_attention)

__all__ = ["IMPLEMENTATIONS", "OP", "PAGED_IMPLEMENTATIONS", "available_implementations", "merge_partials",
           "paged_prefix_attention", "shared_prefix_attention"]
