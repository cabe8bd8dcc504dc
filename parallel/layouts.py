"""Token layouts for sequence parallelism: which tokens each of `num_shards` devices holds.

A layout is a permutation of the sequence axis applied once at the model input (to the tokens *and* their
positions / segment ids) and undone once on the output; sharding the permuted sequence contiguously over the
ring axis then gives each device the tokens the layout assigns it. Attention never looks at the array index,
only at positions, so ring attention is the same code for every layout.

- contiguous: device i holds tokens [i*L/N, (i+1)*L/N) (the original Ring Attention). With a causal mask, device
  N-1 does N times the work of device 0.
- striped: token t on device t mod N (Striped Attention, Brandon et al. 2023): every device sees a near
  triangular mask at every ring step, so the causal work is balanced.
- zigzag (dual chunk): the sequence is cut into 2N chunks and device i holds chunks i and 2N-1-i (a cheap chunk
  and an expensive one), also balanced, and keeps runs of consecutive tokens.

All functions are pure reshapes / transposes / slices, work on numpy or jax arrays, and need the length along
`axis` to be divisible by `num_shards` (zigzag: by 2 * num_shards).
"""

from __future__ import annotations

import functools

import jax
import numpy as np
from jax.sharding import AxisType

__all__ = ["LAYOUTS", "striped_permute", "striped_unpermute", "zigzag_permute", "zigzag_unpermute",
           "contiguous_permute", "contiguous_unpermute", "permute", "unpermute", "layout_positions"]


def _xp(x):
  if isinstance(x, np.ndarray):
    return np
  import jax.numpy as jnp
  return jnp


def _on_any_sharding(fn, x, num_shards: int, axis: int):
  """fn(x, num_shards, axis) for numpy arrays and for jax arrays of any sharding.

  The permutation moves tokens between devices, which Explicit sharding rules cannot type on their own: it runs
  with those axes treated as Auto (XLA picks the all-to-all) and the result gets x's sharding back.
  """
  if isinstance(x, np.ndarray):
    return fn(x, num_shards, axis)
  sharding = jax.typeof(x).sharding
  mesh = sharding.mesh
  explicit = tuple(a for a, t in zip(mesh.axis_names, mesh.axis_types) if t == AxisType.Explicit)
  if not explicit:
    return fn(x, num_shards, axis)
  return jax.sharding.auto_axes(lambda y: fn(y, num_shards, axis), axes=explicit, out_sharding=sharding)(x)


def _layout_op(fn, inverse):
  """The public permutation: fn on any sharding, with the VJP `inverse` of the cotangent on the cotangent's own
  sharding. (Autodiff through fn's reshapes would transpose them with the input's sharding rules, which fails
  when the cotangent arrives sharded, e.g. the input was permuted before being placed on the mesh.)"""

  @functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2))
  def op(x, num_shards, axis):
    return _on_any_sharding(fn, x, num_shards, axis)

  def op_fwd(x, num_shards, axis):
    return op(x, num_shards, axis), None

  def op_bwd(num_shards, axis, _, ct):
    return (_on_any_sharding(inverse, ct, num_shards, axis),)

  op.defvjp(op_fwd, op_bwd)

  def wrapped(x, num_shards: int, axis: int = 1):
    if isinstance(x, np.ndarray):
      return fn(x, num_shards, axis)
    return op(x, int(num_shards), int(axis))

  wrapped.__name__ = wrapped.__qualname__ = fn.__name__.lstrip("_")
  wrapped.__doc__ = fn.__doc__
  return wrapped


def _split(x, axis, sizes, multiple, name):
  axis = axis % x.ndim
  length = x.shape[axis]
  if length % multiple:
    raise ValueError(f"{name}: length {length} along axis {axis} is not divisible by {multiple}")
  return axis, x.shape[:axis] + tuple(sizes(length)) + x.shape[axis + 1:]


def contiguous_permute(x, num_shards: int, axis: int = 1):
  """Identity (the original Ring Attention layout); checks the length divides."""
  _split(x, axis, lambda n: (n,), num_shards, "contiguous_permute")
  return x


contiguous_unpermute = contiguous_permute


def _striped_permute(x, num_shards: int, axis: int = 1):
  """Reorder so that sharding `axis` into num_shards contiguous blocks puts token t on device t % num_shards."""
  axis, shape = _split(x, axis, lambda n: (n // num_shards, num_shards), num_shards, "striped_permute")
  y = x.reshape(shape).swapaxes(axis, axis + 1)
  return y.reshape(x.shape)


def _striped_unpermute(x, num_shards: int, axis: int = 1):
  """Inverse of striped_permute."""
  axis, shape = _split(x, axis, lambda n: (num_shards, n // num_shards), num_shards, "striped_unpermute")
  y = x.reshape(shape).swapaxes(axis, axis + 1)
  return y.reshape(x.shape)


def _zigzag_permute(x, num_shards: int, axis: int = 1):
  """Reorder into 2N chunks so that device i (of N contiguous blocks) holds chunks i and 2N-1-i."""
  n = num_shards
  axis, shape = _split(x, axis, lambda L: (2, n, L // (2 * n)), 2 * n, "zigzag_permute")
  xp = _xp(x)
  y = x.reshape(shape)  # [..., half, device, chunk, ...]
  first, second = _halves(y, axis)
  y = xp.concatenate([first, xp.flip(second, axis=axis + 1)], axis=axis)  # second half: chunks 2N-1 ... N
  return y.swapaxes(axis, axis + 1).reshape(x.shape)  # [..., device, half, chunk, ...]


def _zigzag_unpermute(x, num_shards: int, axis: int = 1):
  """Inverse of zigzag_permute."""
  n = num_shards
  axis, shape = _split(x, axis, lambda L: (n, 2, L // (2 * n)), 2 * n, "zigzag_unpermute")
  xp = _xp(x)
  y = x.reshape(shape).swapaxes(axis, axis + 1)  # [..., half, device, chunk, ...]
  first, second = _halves(y, axis)
  return xp.concatenate([first, xp.flip(second, axis=axis + 1)], axis=axis).reshape(x.shape)


def _halves(y, axis):
  lead = (slice(None),) * axis
  return y[lead + (slice(0, 1),)], y[lead + (slice(1, 2),)]


striped_permute = _layout_op(_striped_permute, _striped_unpermute)
striped_unpermute = _layout_op(_striped_unpermute, _striped_permute)
zigzag_permute = _layout_op(_zigzag_permute, _zigzag_unpermute)
zigzag_unpermute = _layout_op(_zigzag_unpermute, _zigzag_permute)

LAYOUTS = {
    "contiguous": (contiguous_permute, contiguous_unpermute),
    "striped": (striped_permute, striped_unpermute),
    "zigzag": (zigzag_permute, zigzag_unpermute),
}


def _layout(name: str):
  if name not in LAYOUTS:
    raise ValueError(f"layout={name!r} is not one of {sorted(LAYOUTS)}")
  return LAYOUTS[name]


def permute(x, layout: str, num_shards: int, axis: int = 1):
  return _layout(layout)[0](x, num_shards, axis)


def unpermute(x, layout: str, num_shards: int, axis: int = 1):
  return _layout(layout)[1](x, num_shards, axis)


def layout_positions(layout: str, length: int, num_shards: int, batch: int | None = None):
  """Token positions 0..length-1 in the order the layout stores them (numpy int32; [batch, length] if given)."""
  pos = permute(np.arange(length, dtype=np.int32), layout, num_shards, axis=0)
  return pos if batch is None else np.broadcast_to(pos, (batch, length)).copy()
