"""KV-cache eviction policies of the engine (config section engine.kv_policy); see docs/kv_compression.md.

One file per policy (streaming.py, snapkv.py, h2o.py, duo.py with its store duo_store.py, duo_masked.py),
registered by name (registry.py); the shared host side is base.py, the attention pass attention.py, the
device programs device.py, dense references reference.py."""

from jaxinfer.engine.kv_policies.config import KVPolicyConfig  # noqa: F401
from jaxinfer.engine.kv_policies.registry import make_policy, names, register  # noqa: F401
