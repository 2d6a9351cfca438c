"""Device mesh over the axes (data, fsdp, tensor, expert) with Auto axis types (DESIGN §6)."""

import jax
from jax.sharding import AxisType, Mesh, NamedSharding

from configs import sharding
from configs.schema import MeshConfig
from model import axes


def make_mesh(mesh_cfg: MeshConfig, devices=None) -> Mesh:
  """A mesh of `mesh_cfg.shape` (one -1 filled in) over `devices` (default: all of them)."""
  devices = list(devices if devices is not None else jax.devices())
  shape = mesh_cfg.resolved_shape(len(devices))
  return jax.make_mesh(shape, sharding.MESH_AXES, axis_types=(AxisType.Auto,) * len(shape),
                       devices=devices)


def batch_sharding(mesh: Mesh, rules: dict) -> NamedSharding:
  """Sharding of a [batch, length] token array: batch over every data-like axis."""
  return NamedSharding(mesh, axes.logical_to_spec(('batch', 'length'), rules, mesh))


def data_parallel_size(mesh: Mesh, rules: dict) -> int:
  spec = axes.logical_to_spec(('batch',), rules, mesh)[0]
  names = (spec,) if isinstance(spec, str) else (spec or ())
  size = 1
  for name in names:
    size *= mesh.shape[name]
  return size
