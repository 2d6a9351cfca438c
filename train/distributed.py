"""Multi-controller start-up: one process per host, all processes' devices in one global mesh.

`initialize` starts `jax.distributed` when this process is one of several; everything after it
(mesh, data, checkpoints) is written for any number of processes. Where the parameters come from,
first match wins:
  1. explicit values (train.train's --coordinator_address, --num_processes, --process_id);
  2. the environment: ROUTED_COORDINATOR_ADDRESS, ROUTED_NUM_PROCESSES, ROUTED_PROCESS_ID
     (what `python -m train.launch` sets for local multi-process runs);
  3. a detected cluster (a multi-worker TPU pod slice, a SLURM step or an Open MPI job with more
     than one task): `jax.distributed.initialize()` reads the parameters from it.
Otherwise the run is single-process and nothing is started.

A failed process records its one-line error in the coordination service's key-value store before
it exits, so the other processes (which then fail in a collective or a barrier) report the cause
instead of a bare connection error: `peer_errors()`.
"""

import os

import jax
import numpy as np
from absl import logging

ENV = {
  'coordinator_address': 'ROUTED_COORDINATOR_ADDRESS',
  'num_processes': 'ROUTED_NUM_PROCESSES',
  'process_id': 'ROUTED_PROCESS_ID',
}
_ERROR_KEY = 'routed_transformers/error/'


def _cluster_detected() -> bool:
  """True on a multi-host TPU slice, a multi-task SLURM step or a multi-rank MPI job."""
  env = os.environ
  if len([h for h in env.get('TPU_WORKER_HOSTNAMES', '').split(',') if h]) > 1:
    return True
  for name in ('SLURM_STEP_NUM_TASKS', 'SLURM_NTASKS', 'OMPI_COMM_WORLD_SIZE'):
    if env.get(name, '').isdigit() and int(env[name]) > 1:
      return True
  return False


def parameters(
  coordinator_address: str = '', num_processes: int = 0, process_id: int = -1
) -> dict | None:
  """The explicit or environment parameters, {} for cluster auto-detection, None if single-process."""
  values = {
    'coordinator_address': coordinator_address or os.environ.get(ENV['coordinator_address'], ''),
    'num_processes': num_processes or int(os.environ.get(ENV['num_processes'], '0') or 0),
    'process_id': process_id
    if process_id >= 0
    else int(os.environ.get(ENV['process_id'], '-1') or -1),
  }
  given = [
    k
    for k, unset in (('coordinator_address', ''), ('num_processes', 0), ('process_id', -1))
    if values[k] != unset
  ]
  if given:
    missing = [k for k in values if k not in given]
    if missing and values['num_processes'] != 1:
      raise ValueError(
        f'--{missing[0]} (or ${ENV[missing[0]]}) is missing: a multi-process run '
        f'needs --coordinator_address, --num_processes and --process_id'
      )
    if values['num_processes'] == 1:
      return None
    if not 0 <= values['process_id'] < values['num_processes']:
      raise ValueError(
        f'--process_id={values["process_id"]}: expected 0 <= id < '
        f'--num_processes={values["num_processes"]}'
      )
    return values
  return {} if _cluster_detected() else None


def initialize(
  coordinator_address: str = '',
  num_processes: int = 0,
  process_id: int = -1,
  heartbeat_timeout_seconds: int = 100,
) -> bool:
  """Starts jax.distributed for a multi-process run (see the module docstring); True if it did."""
  params = parameters(coordinator_address, num_processes, process_id)
  if params is None:
    return False
  # CPU processes need a collectives backend across processes (GPU/TPU have their own).
  jax.config.update('jax_cpu_collectives_implementation', 'gloo')
  jax.distributed.initialize(**params, heartbeat_timeout_seconds=heartbeat_timeout_seconds)
  logging.info(
    'process %d of %d: %d local devices, %d in all',
    jax.process_index(),
    jax.process_count(),
    jax.local_device_count(),
    jax.device_count(),
  )
  return True


def _client():
  """The coordination-service client of a multi-process run, or None."""
  if jax.process_count() == 1:
    return None
  from jax._src import distributed  # no public handle on the key-value store  # pylint: disable=g-import-not-at-top

  return distributed.global_state.client


def report_error(message: str) -> None:
  """Leaves this process's error where the other processes can read it (best effort)."""
  try:
    client = _client()
    if client is not None:
      client.key_value_set(f'{_ERROR_KEY}{jax.process_index()}', message)
  except Exception:  # the service may be gone already; the local log still has the message
    pass


def peer_errors() -> list[str]:
  """'process N: message' for every other process that reported an error."""
  try:
    client = _client()
    if client is None:
      return []
    entries = client.key_value_dir_get(_ERROR_KEY)
  except Exception:
    return []
  me = str(jax.process_index())
  return [
    f'process {key.rsplit("/", 1)[-1]}: {value}'
    for key, value in sorted(entries)
    if key.rsplit('/', 1)[-1] != me
  ]


def all_processes(ok: bool) -> bool:
  """True when `ok` holds in every process (a collective: every process must call it)."""
  if jax.process_count() == 1:
    return ok
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top

  return bool(np.all(multihost_utils.process_allgather(np.int32(ok))))


def barrier(name: str) -> None:
  """Waits until every process reached the barrier `name` (no-op in a single process)."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top

    multihost_utils.sync_global_devices(name)
