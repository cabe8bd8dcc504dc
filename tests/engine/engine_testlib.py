"""Helpers shared by the engine tests (importable because conftest.py puts this folder on sys.path)."""

import jaxinfer

CFG = jaxinfer.ModelConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
                           num_kv_heads=2, max_position_embeddings=256, initializer_range=0.2)

