"""Decode attention through a page table (paged_attention) and the ragged mixed prefill/decode step
(ragged_paged_attention); see api.py."""

from pallas_kernels.paged_attention.api import (
    DEFAULT_FOR_BACKEND,
    IMPLEMENTATIONS,
    available_implementations,
    paged_attention,
    ragged_paged_attention,
)

__all__ = ["DEFAULT_FOR_BACKEND", "IMPLEMENTATIONS", "available_implementations", "paged_attention",
           "ragged_paged_attention"]
