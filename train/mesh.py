"""Device mesh over the axes (data, fsdp, tensor, expert) with Auto axis types (docs/design.md §8).

The mesh is hybrid over the granules joined by the slower network: processes (hosts) on CPU and
GPU, slices on TPU. `mesh.dcn_shape` says how many granules each axis spans, the rest of each axis
runs inside a granule over its fast interconnect (ICI/NVLink). By default the granules go on the
outermost axis whose size they divide: the data axis when it is large enough, else FSDP; only that
axis's collectives cross them. One TPU slice is one granule however many hosts it has: its chips
share the ICI torus, and `jax.make_mesh` lays the axes out on it.
"""

import math

import jax
from jax.experimental import mesh_utils
from jax.sharding import AxisType, Mesh, NamedSharding

from configs import sharding
from configs.schema import MeshConfig
from model import axes
from model.config import ConfigError


def dcn_shape(
  mesh_cfg: MeshConfig, shape: tuple[int, ...], processes: int, unit: str = 'processes'
) -> tuple[int, ...]:
  """Granules (processes; TPU slices) per mesh axis: `mesh.dcn_shape`, or all of them on the
  outermost axis they divide."""
  if mesh_cfg.dcn_shape:
    dcn = tuple(mesh_cfg.dcn_shape)
    if math.prod(dcn) != processes or any(s % d for s, d in zip(shape, dcn)):
      raise ConfigError(
        f'mesh.dcn_shape={dcn}: expected sizes dividing mesh.shape={shape} whose '
        f'product is the {processes} {unit}'
      )
    return dcn
  for i, size in enumerate(shape):
    if size % processes == 0:
      return tuple(processes if j == i else 1 for j in range(len(shape)))
  raise ConfigError(
    f'mesh.shape={shape}: no axis divides over the {processes} {unit}; set mesh.dcn_shape'
  )


def make_mesh(mesh_cfg: MeshConfig, devices=None) -> Mesh:
  """A mesh of `mesh_cfg.shape` (one -1 filled in) over `devices` (default: all of them)."""
  devices = list(devices if devices is not None else jax.devices())
  shape = mesh_cfg.resolved_shape(len(devices))
  types = (AxisType.Auto,) * len(shape)
  by_process = devices[0].platform != 'tpu'
  granules = len({d.process_index if by_process else getattr(d, 'slice_index', 0) for d in devices})
  unit, one = ('processes', 'process') if by_process else ('TPU slices', 'TPU slice')
  if granules == 1:
    if math.prod(mesh_cfg.dcn_shape or (1,)) > 1:
      raise ConfigError(f'mesh.dcn_shape={tuple(mesh_cfg.dcn_shape)}: these devices are one {one}')
    return jax.make_mesh(shape, sharding.MESH_AXES, axis_types=types, devices=devices)
  dcn = dcn_shape(mesh_cfg, shape, granules, unit)
  ici = tuple(s // d for s, d in zip(shape, dcn))
  grid = mesh_utils.create_hybrid_device_mesh(ici, dcn, devices, process_is_granule=by_process)
  return Mesh(grid, sharding.MESH_AXES, axis_types=types)


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
