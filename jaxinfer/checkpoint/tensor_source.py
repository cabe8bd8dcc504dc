"""Per-parameter sources for sharded loading: one object per parameter that reads any block of it on demand.

  source.shape, source.dtype        # the parameter in OUR layout (Linear kernels are [in, out])
  source.read(index) -> np.ndarray  # index: a tuple of slices over our layout; the block, in source.dtype

`assemble(source, sharding)` builds the jax.Array with `jax.make_array_from_callback`: each addressable device
asks for its own block, which is read straight from the file (safetensors `get_slice`), so host memory holds
at most one block at a time and no device ever holds a full copy of a sharded parameter. Replicated blocks
are read once per distinct index, not once per device.

A new checkpoint layout is a new TensorSource (e.g. a stack of per-expert HF tensors read into one
[experts, in, out] parameter); load_hf only builds sources and assembles them.
"""

from __future__ import annotations

import numpy as np


class TensorSource:
  """The interface: shape and dtype of the parameter in our layout; read(index) -> that block."""

  shape: tuple[int, ...]
  dtype: np.dtype

  def read(self, index: tuple[slice, ...]) -> np.ndarray:
    raise NotImplementedError


def _full(index, shape) -> tuple[slice, ...]:
  """index padded with full slices to the rank of shape (make_array_from_callback may pass fewer)."""
  index = tuple(index) + (slice(None),) * (len(shape) - len(tuple(index)))
  return tuple(slice(*s.indices(n)) for s, n in zip(index, shape))


class HFTensor(TensorSource):
  """One tensor of a safetensors file; `transposed`: ours is its transpose (a torch Linear weight [out, in])."""

  def __init__(self, handle, name: str, transposed: bool, dtype):
    self.handle, self.name, self.transposed = handle, name, transposed
    hf_shape = tuple(handle.get_slice(name).get_shape())
    self.shape = hf_shape[::-1] if transposed else hf_shape
    self.dtype = np.dtype(dtype)

  def read(self, index):
    index = _full(index, self.shape)
    block = self.handle.get_slice(self.name)[index[::-1] if self.transposed else index]
    block = np.asarray(block)
    return np.ascontiguousarray(block.T if self.transposed else block).astype(self.dtype, copy=False)


def assemble(source: TensorSource, sharding):
  """The jax.Array of `source` laid out by `sharding`, each device's block read by itself."""
  import jax

  blocks: dict = {}

  def block(index):
    key = tuple((s.start, s.stop) for s in _full(index, source.shape))
    if key not in blocks:  # replicated dimensions: devices sharing an index share one read
      blocks.clear()  # keep one block on the host at a time (devices are visited shard by shard)
      blocks[key] = source.read(index)
    return blocks[key]

  return jax.make_array_from_callback(tuple(source.shape), sharding, block)
