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

# meshes, logical-axis sharding rules, multi-host start-up
from parallel.distributed import initialize_from_env  # noqa: E402
from parallel.mesh import MESH_AXES, ParallelConfigError, MeshConfig, create_mesh, resolve_mesh_shape  # noqa: E402
from parallel.sharding import (DEFAULT_RULES, RULE_PRESETS, create_sharded_module, logical_sharding,  # noqa: E402
                               logical_to_spec, rules_preset, state_shardings)

__all__ += ["DEFAULT_RULES", "MESH_AXES", "ParallelConfigError", "RULE_PRESETS", "create_mesh",
            "create_sharded_module", "initialize_from_env", "logical_sharding", "logical_to_spec", "MeshConfig",
            "resolve_mesh_shape", "rules_preset", "state_shardings"]
