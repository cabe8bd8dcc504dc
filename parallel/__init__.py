"""Meshes, sharding rules, ring/striped attention and collectives.

Exports are additive: each module adds its own public names here.
"""

from parallel.layouts import LAYOUTS, striped_permute, striped_unpermute, zigzag_permute, zigzag_unpermute
from parallel.ring_attention import ring_attention

__all__ = [
    "LAYOUTS",
    "ring_attention",
    "striped_permute",
    "striped_unpermute",
    "zigzag_permute",
    "zigzag_unpermute",
]
