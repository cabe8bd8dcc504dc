"""The mesh `jaxinfer generate` and `jaxinfer serve` run on, from the config's `mesh` section.

Inference may use fewer devices than exist: with no axis at -1, the mesh takes the first data x tensor x ...
devices (one device: no mesh at all, the unsharded path). More devices than exist, or a model whose heads / MLP
do not divide over the axes, is a ConfigError naming the `mesh.<axis>` field, raised before any weight is read.
"""

from __future__ import annotations

import logging
import math

import jax

from jaxinfer.config import ConfigError
from jaxinfer.models.sharding import check_model_mesh
from parallel.mesh import MeshConfig, ParallelConfigError, create_mesh, mesh_summary, resolve_mesh_shape

log = logging.getLogger("jaxinfer.mesh")


def inference_mesh(section, model_config):
  """A Mesh for `section` (a `mesh` config section or None), checked against `model_config`; None for one
  device."""
  if section is None:
    return None
  values = section.to_dict() if hasattr(section, "to_dict") else dict(section)
  devices = jax.devices()
  sizes = {a: values.get(a, getattr(MeshConfig, a, 1)) for a in ("data", "fsdp", "tensor", "sequence", "expert",
                                                                   "stage")}
  wanted = math.prod(s for s in sizes.values() if isinstance(s, int) and s > 0)
  if -1 not in sizes.values() and wanted <= len(devices):
    devices = devices[:wanted]  # inference may leave devices idle
  try:
    shape = resolve_mesh_shape(values, len(devices))
    if shape["fsdp"] > 1 or shape["sequence"] > 1:
      axis = "fsdp" if shape["fsdp"] > 1 else "sequence"
      raise ConfigError(f"mesh.{axis}: inference shards over data and tensor only; set mesh.{axis}=1")
    check_model_mesh(model_config, shape)
    if len(devices) == 1:
      return None
    mesh = create_mesh(values, devices)
  except ParallelConfigError as e:
    raise ConfigError(str(e)) from None
  log.info("inference mesh: %s", mesh_summary(mesh))
  return mesh
