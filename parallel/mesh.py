"""Device meshes from a config section: axes data, fsdp, tensor, sequence, expert (stage reserved).

A `mesh` config section holds one size per axis; -1 means "all the devices the other axes leave" (at most one
axis may say -1). The product must equal the number of devices. Axes of size 1 are kept in the mesh (so specs
may always name every axis) and dropped from partition specs by `parallel.sharding`.

Axis types. jaxinfer's training meshes use `AxisType.Auto` on every axis: the model code is written without
sharding annotations (plain `jnp.dot`), and the layout is fixed at the jit boundary by NamedSharding
in/out shardings derived from the logical-axis rules (params, optimizer state, batch), then propagated by the
compiler. With Explicit axes (sharding in types, `jax.make_mesh`'s default since JAX 0.10) every matmul whose
operands disagree (e.g. FSDP: batch and the weight's embed dim both over `fsdp`) would need an explicit
`reshard` in the model; Auto keeps one model source for every parallelism strategy. `create_mesh` takes
`axis_type=` for code that wants Explicit axes; public functions in `parallel` (ring attention, layouts)
accept arrays on meshes of either kind.

Multi-host: with several processes the device order comes from `mesh_utils.create_device_mesh` (ICI-aware on
TPU/GPU). Setting `mesh.dcn_<axis>` > 1 splits that axis into a slow (DCN, across slices / hosts) part of that
size and a fast part, via `mesh_utils.create_hybrid_device_mesh`.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping, Sequence

import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import AxisType, Mesh

__all__ = ["MESH_AXES", "MeshConfig", "ParallelConfigError", "resolve_mesh_shape", "create_mesh",
           "mesh_summary"]

# Order matters: outer (slow, data-like) axes first, so the inner axes land on neighbouring devices.
MESH_AXES = ("data", "stage", "fsdp", "expert", "sequence", "tensor")
RESERVED_AXES = ("stage",)  # accepted in configs, must be 1 until the model uses them (expert: MoE models)


class ParallelConfigError(ValueError):
  """A mesh or sharding config value is impossible; the message starts with the field, e.g. `mesh.fsdp: ...`.

  (`parallel` does not import `jaxinfer`; callers there re-raise it as jaxinfer's ConfigError.)
  """


def _fail(field: str, message: str):
  raise ParallelConfigError(f"{field}: {message}")


@dataclasses.dataclass(frozen=True)
class MeshConfig:
  """The `mesh` config section: one size per axis (-1: the devices the other axes leave) and dcn_ splits.

  Checked against the devices by `resolve_mesh_shape` (the device count is only known then).
  """
  SECTION = "mesh"
  data: int = -1
  fsdp: int = 1
  tensor: int = 1
  sequence: int = 1
  expert: int = 1
  stage: int = 1
  dcn_data: int = 1
  dcn_fsdp: int = 1
  dcn_tensor: int = 1
  dcn_sequence: int = 1
  dcn_expert: int = 1
  dcn_stage: int = 1


def _as_dict(section) -> dict[str, Any]:
  if section is None:
    return {}
  if dataclasses.is_dataclass(section):
    return dataclasses.asdict(section)
  if hasattr(section, "to_dict"):
    return section.to_dict()
  return dict(section)


def resolve_mesh_shape(section: Mapping[str, Any] | Any, num_devices: int, prefix: str = "mesh"
                       ) -> dict[str, int]:
  """Axis sizes (in MESH_AXES order) with -1 filled in; raises ParallelConfigError naming `mesh.<axis>`."""
  values = _as_dict(section)
  known = set(MESH_AXES) | {f"dcn_{a}" for a in MESH_AXES}
  unknown = sorted(set(values) - known)
  if unknown:
    _fail(f"{prefix}.{unknown[0]}", f"unknown mesh field; axes are {', '.join(MESH_AXES)} (and dcn_<axis>)")
  sizes = {axis: values.get(axis, 1) for axis in MESH_AXES}
  for axis, size in sizes.items():
    if not isinstance(size, (int, np.integer)) or isinstance(size, bool) or (size < 1 and size != -1):
      _fail(f"{prefix}.{axis}", f"must be a positive integer or -1 (the rest of the devices), got {size!r}")
  for axis in RESERVED_AXES:
    if sizes[axis] not in (1, -1):
      _fail(f"{prefix}.{axis}", f"axis {axis!r} is reserved (no model uses it yet); its size must be 1, "
            f"got {sizes[axis]}")
  rest = [axis for axis, size in sizes.items() if size == -1]
  if len(rest) > 1:
    _fail(f"{prefix}.{rest[1]}", f"at most one axis may be -1, but {', '.join(rest)} all are")
  fixed = math.prod(size for size in sizes.values() if size != -1)
  if rest:
    axis = rest[0]
    if num_devices % fixed:
      _fail(f"{prefix}.{axis}", f"-1 cannot be resolved: the other axes multiply to {fixed}, which does not "
            f"divide the {num_devices} devices ({_describe(sizes)})")
    sizes[axis] = num_devices // fixed
  elif fixed != num_devices:
    biggest = max((a for a in MESH_AXES if sizes[a] > 1), key=lambda a: sizes[a], default="data")
    _fail(f"{prefix}.{biggest}", f"the mesh axes multiply to {fixed} ({_describe(sizes)}) but there are "
          f"{num_devices} devices; set one axis to -1 to take the rest")
  for axis in RESERVED_AXES:
    if sizes[axis] != 1:
      _fail(f"{prefix}.{axis}", f"axis {axis!r} is reserved; -1 resolved it to {sizes[axis]}, it must be 1")
  for axis in MESH_AXES:
    dcn = values.get(f"dcn_{axis}", 1)
    if not isinstance(dcn, (int, np.integer)) or dcn < 1 or sizes[axis] % dcn:
      _fail(f"{prefix}.dcn_{axis}", f"must be a positive divisor of mesh.{axis}={sizes[axis]}, got {dcn!r}")
  return sizes


def _describe(sizes: Mapping[str, int]) -> str:
  return " x ".join(f"{a}={s}" for a, s in sizes.items() if s != 1) or "all axes 1"


def create_mesh(section: Mapping[str, Any] | Any = None, devices: Sequence[Any] | None = None, *,
                axis_type: AxisType = AxisType.Auto, prefix: str = "mesh") -> Mesh:
  """The mesh a `mesh` config section describes, over `devices` (default: all of jax.devices()).

  Every axis of MESH_AXES is present (size-1 axes included), all of type `axis_type` (default Auto: see the
  module docstring for why).
  """
  devices = list(jax.devices() if devices is None else devices)
  sizes = resolve_mesh_shape(section, len(devices), prefix)
  values = _as_dict(section)
  shape = tuple(sizes[a] for a in MESH_AXES)
  dcn = tuple(int(values.get(f"dcn_{a}", 1)) for a in MESH_AXES)
  if math.prod(dcn) > 1:
    ici = tuple(s // d for s, d in zip(shape, dcn))
    # Granules of the slow network: TPU slices when there are several, otherwise processes (hosts).
    slices = {getattr(d, "slice_index", None) for d in devices}
    process_is_granule = len(slices) <= 1 or None in slices
    try:
      array = mesh_utils.create_hybrid_device_mesh(ici, dcn, devices, process_is_granule=process_is_granule,
                                                   allow_split_physical_axes=True)
    except (ValueError, AssertionError) as e:
      field = next(f"dcn_{a}" for a, d in zip(MESH_AXES, dcn) if d > 1)
      _fail(f"{prefix}.{field}", f"cannot split the mesh {dict(zip(MESH_AXES, shape))} into ICI {ici} x DCN "
            f"{dcn} over these devices: {e}")
  else:
    try:
      array = mesh_utils.create_device_mesh(shape, devices, allow_split_physical_axes=True)
    except (ValueError, AssertionError, NotImplementedError):
      array = np.asarray(devices, dtype=object).reshape(shape)  # no topology information: plain order
  return Mesh(array, MESH_AXES, axis_types=(axis_type,) * len(MESH_AXES))


def mesh_summary(mesh: Mesh) -> str:
  """'data=2 x tensor=4 (Auto)': the axes of size > 1."""
  parts = [f"{a}={s}" for a, s in mesh.shape.items() if s > 1] or ["single device"]
  kinds = sorted({str(t).split(".")[-1] for t in mesh.axis_types})
  return " x ".join(parts) + f" ({'/'.join(kinds)})"
