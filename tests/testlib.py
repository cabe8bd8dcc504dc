"""Helpers shared across the test suite (importable as `testlib`: pyproject puts tests/ on pythonpath).

- assert_close: max abs error <= tol * max(1, max |expected|), finiteness must agree (NaN-filled invisible
  slots stay NaN in neither or both); close_error gives the numbers (benchmarks/device_check.py records them).
- packed_segments, nan_outside, random_page_table: the kernel tests' random masks, poisoned caches and
  page tables.
- randn: reproducible standard-normal values without paying threefry's compile per shape.
- tiny_model_config: the small random Llama shapes the engine, generation and sharding tests use.
"""

from __future__ import annotations

import functools
import zlib

import jax
import jax.numpy as jnp
import numpy as np


def close_error(actual, expected, what="value"):
  """(max abs error over the finite expected entries, scale = max(1, max |expected|)) after the shape and
  finiteness checks of assert_close (AssertionError if those fail)."""
  a = np.asarray(jnp.asarray(actual, jnp.float32))
  e = np.asarray(jnp.asarray(expected, jnp.float32))
  assert a.shape == e.shape, (what, a.shape, e.shape)
  assert np.all(np.isfinite(a) == np.isfinite(e)), f"{what}: finiteness differs"
  fin = np.isfinite(e)
  if not fin.any():
    return 0.0, 1.0
  return float(np.max(np.abs(a[fin] - e[fin]))), max(1.0, float(np.max(np.abs(e[fin]))))


def assert_close(actual, expected, tol, what):
  err, scale = close_error(actual, expected, what)
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


# ------------------------------------------------------------------------------------ kernel test helpers


def packed_segments(rng: np.random.Generator, batch: int, length: int, n: int):
  """int32 [batch, length] sorted packing segment ids with n - 1 random boundaries per row."""
  cuts = np.sort(rng.integers(1, length, size=(batch, n - 1)), axis=-1)
  return jnp.asarray((np.arange(length)[None, :, None] >= cuts[:, None, :]).sum(-1).astype(np.int32))


def nan_outside(x, visible):
  """x (numpy) with NaN wherever `visible` (broadcast over x's trailing dims) is False: a cache slot an
  implementation must not read fails loudly if it does."""
  vis = np.asarray(visible).reshape(np.shape(visible) + (1,) * (np.ndim(x) - np.ndim(visible)))
  return np.where(vis, x, np.nan)


def random_page_table(rng: np.random.Generator, num_pages: int, rows: int, pages_per_row: int):
  """int32 [rows, pages_per_row] of distinct page ids drawn from range(num_pages) in random order."""
  assert rows * pages_per_row <= num_pages, (rows, pages_per_row, num_pages)
  return rng.permutation(num_pages)[:rows * pages_per_row].reshape(rows, pages_per_row).astype(np.int32)


def slow_when(condition: bool, *values):
  """A parametrize entry marked `slow` (pyproject's marker: `-m "not slow"` skips it) when condition holds."""
  import pytest

  return pytest.param(*values, marks=[pytest.mark.slow] if condition else [])


def assert_forced_implementations(call, api, *, interpreted=None):
  """An op's public function (`call(implementation)`) on CPU: a forced Pallas implementation raises a
  RuntimeError naming it (no silent fallback), an unknown name a ValueError naming `implementation`;
  available_implementations() is {reference, xla}, and with interpret=True `interpreted` (default: all)."""
  import pytest

  for impl in ("pallas_gpu", "pallas_tpu"):
    with pytest.raises(RuntimeError, match=impl):
      call(impl)
  with pytest.raises(ValueError, match="implementation='nope'"):
    call("nope")
  assert set(api.available_implementations()) == {"reference", "xla"}
  assert set(api.available_implementations(interpret=True)) == set(interpreted or api.IMPLEMENTATIONS)


def assert_same_or_near_tie(model, prompt, got, want, what):
  """Engine tokens `got` equal generate's `want`, or first differ at a float near-tie: the top-2 logits of
  the full forward within 1e-4 and the engine's token the runner-up (the engine's logits depend at the 1e-6
  level on the step's padded shape, so only a true tie may flip)."""
  if got == want:
    return
  i = next((j for j, (a, b) in enumerate(zip(got, want)) if a != b), min(len(got), len(want)))
  assert i < min(len(got), len(want)), f"{what}: {len(got)} tokens, generate gave {len(want)}"
  logits = np.asarray(model(np.asarray([prompt + want[:i]]))[0, -1])
  first, second = np.argsort(logits)[::-1][:2]
  gap = float(logits[first] - logits[second])
  assert gap < 1e-4 and got[i] == second, f"{what}: diverges from generate at token {i} (logit gap {gap:.3g})"


def drive_with_arrivals(engine, prompts, news, rng, sampling=None):
  """Serves prompts arriving at random steps (prefills share steps with decodes), forcing a preemption now and
  then, checking the page pool after every step; returns each prompt's new tokens."""
  sampling = sampling or [None] * len(prompts)
  index_of, got, arrived, steps = {}, {}, 0, 0
  while arrived < len(prompts) or engine.has_unfinished():
    if arrived < len(prompts) and rng.random() < 0.6:
      index_of[engine.add_request(prompts[arrived], sampling[arrived], max_new_tokens=news[arrived])] = arrived
      arrived += 1
    if engine.num_running > 1 and rng.random() < 0.15:  # forced preemption
      engine.preempt(engine.scheduler.running[int(rng.integers(0, engine.num_running))].request_id)
    for out in engine._checked_step():
      got.setdefault(index_of[out.request_id], []).extend(out.new_token_ids)
    engine.check_pages()
    steps += 1
    assert steps < 500, "no progress"
  return [got.get(i, []) for i in range(len(prompts))]
