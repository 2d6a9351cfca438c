"""Device topologies a run can be planned for, without their devices (`python -m train.plan`).

`cpu:N` is N host devices of this process (a GPU-shaped mesh for structure and memory checks; an
ahead-of-time compilation for GPUs needs a GPU). A TPU topology such as `v5p:4x4x4` comes from
libtpu's compiler (`jax.experimental.topologies`), installed with the `tpu` extra. Each chip's
peaks come from its public Cloud TPU page, named in `Chip.source`.
"""

import dataclasses
import importlib.util
import math
import os
import re

import jax

from model.config import ConfigError

_GiB = 1 << 30


@dataclasses.dataclass(frozen=True)
class Chip:
  """A chip's public peaks: bf16 FLOP/s, HBM bytes and bytes/s, ICI bytes/s per chip
  (bidirectional; None where the public page gives none)."""

  name: str
  hbm_bytes: int
  bf16_flops: float
  hbm_bytes_per_s: float
  ici_bytes_per_s: float | None
  dims: int  # topology dimensions: 2 (AxB) or 3 (AxBxC)
  source: str


CHIPS = {
  'v4': Chip('TPU v4', 32 * _GiB, 275e12, 1200e9, None, 3, 'https://cloud.google.com/tpu/docs/v4'),
  'v5e': Chip('TPU v5e', 16 * _GiB, 197e12, 819e9, 400e9, 2, 'https://cloud.google.com/tpu/docs/v5e'),
  'v5p': Chip('TPU v5p', 95 * _GiB, 459e12, 2765e9, 1200e9, 3, 'https://cloud.google.com/tpu/docs/v5p'),
  'v6e': Chip('TPU v6e', 32 * 10**9, 918e12, 1638e9, 800e9, 2, 'https://cloud.google.com/tpu/docs/v6e'),
}  # fmt: skip

FORMS = 'cpu:N, ' + ', '.join(
  f'{k}:{"x".join("AB" if c.dims == 2 else "ABC")}' for k, c in CHIPS.items()
)


@dataclasses.dataclass(frozen=True)
class Topology:
  name: str  # as given: 'v5p:4x4x4', 'cpu:8'
  platform: str  # 'tpu' | 'cpu'
  devices: tuple
  chip: Chip | None  # None for cpu


def parse(name: str) -> tuple[str, tuple[int, ...]]:
  """('cpu' or a chip key, dimensions); a one-line ConfigError for any other form."""
  m = re.fullmatch(r'cpu:(\d+)', name)
  if m and int(m.group(1)) > 0:
    return 'cpu', (int(m.group(1)),)
  m = re.fullmatch(r'(v\d+[a-z]*):(\d+(?:x\d+)*)', name)
  if m and m.group(1) in CHIPS:
    dims = tuple(int(d) for d in m.group(2).split('x'))
    if len(dims) == CHIPS[m.group(1)].dims and all(dims):
      return m.group(1), dims
  raise ConfigError(f'--topology={name!r}: expected one of the forms {FORMS}')


def devices_for(name: str) -> Topology:
  """The (abstract) devices of topology `name`; one-line ConfigErrors when they cannot be had."""
  kind, dims = parse(name)
  if kind == 'cpu':
    have = jax.devices('cpu')
    if len(have) < dims[0]:
      raise ConfigError(
        f'--topology={name}: this process has {len(have)} CPU devices; run train.plan as a '
        'program (it sets --xla_force_host_platform_device_count before jax starts)'
      )
    return Topology(name, 'cpu', tuple(have[: dims[0]]), None)
  if importlib.util.find_spec('libtpu') is None:
    raise ConfigError(
      f"--topology={name}: TPU topologies need libtpu's compiler; install the tpu extra: "
      "pip install -e '.[tpu]' (Linux x86_64)"
    )
  from jax.experimental import topologies  # pylint: disable=g-import-not-at-top

  # Compiling touches no chip: several planning processes (test workers) may load libtpu at once,
  # and off a TPU VM there are no workers to look up (libtpu would print an error about them).
  os.environ.setdefault('ALLOW_MULTIPLE_LIBTPU_LOAD', '1')
  platforms = jax.config.jax_platforms or ''
  if platforms and 'tpu' not in platforms:  # this process runs no TPU (configs/cli.py)
    os.environ.setdefault('TPU_WORKER_HOSTNAMES', 'localhost')

  try:
    desc = topologies.get_topology_desc(name, platform='tpu')
  except Exception as e:  # pylint: disable=broad-except  (libtpu's own message)
    first = str(e).splitlines()[0] if str(e) else type(e).__name__
    raise ConfigError(f'--topology={name}: libtpu could not describe it ({first})') from e
  devices = tuple(desc.devices)
  if len(devices) != math.prod(dims):
    raise ConfigError(f'--topology={name}: libtpu returned {len(devices)} devices')
  return Topology(name, 'tpu', devices, CHIPS[kind])
