"""Helpers shared across the test suite (importable as `testlib`: pyproject puts tests/ on pythonpath).

- assert_close: max abs error <= tol * max(1, max |expected|), finiteness must agree (NaN-filled invisible
  slots stay NaN in neither or both).
- randn: reproducible standard-normal values without paying threefry's compile per shape.
- tiny_model_config: the small random Llama shapes the engine, generation and sharding tests use.
"""

from __future__ import annotations

import functools
import zlib

import jax
import jax.numpy as jnp
import numpy as np


def assert_close(actual, expected, tol, what):
  a = np.asarray(jnp.asarray(actual, jnp.float32))
  e = np.asarray(jnp.asarray(expected, jnp.float32))
  assert a.shape == e.shape, (what, a.shape, e.shape)
  assert np.all(np.isfinite(a) == np.isfinite(e)), f"{what}: finiteness differs"
  fin = np.isfinite(e)
  if not fin.any():
    return
  err = np.max(np.abs(a[fin] - e[fin]))
  scale = max(1.0, float(np.max(np.abs(e[fin]))))
  assert err <= tol * scale, f"{what}: max abs error {err:.3g} > {tol:g} * {scale:.3g}"


@functools.lru_cache(maxsize=1)
def _pool() -> np.ndarray:
  # jax.random.normal costs ~1 s of XLA compile (threefry) per shape, more than the kernels under test.
  return np.asarray(jax.random.normal(jax.random.key(20240601), (1 << 21,), jnp.float32))


def randn(shape, tag: str, dtype=jnp.float32):
  """Standard-normal values for `shape`, a fixed slice of the pool chosen by `tag` (reproducible per tag)."""
  pool = _pool()
  n = int(np.prod(shape))
  start = zlib.crc32(tag.encode()) % (pool.size - n)
  return jnp.asarray(pool[start:start + n].reshape(shape)).astype(dtype)


def tiny_model_config(**overrides):
  """A 2-layer GQA Llama small enough to compile in seconds; overrides replace any ModelConfig field."""
  import jaxinfer

  fields = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4, num_kv_heads=2,
                max_position_embeddings=256, initializer_range=0.2)
  fields.update(overrides)
  return jaxinfer.ModelConfig(**fields)
