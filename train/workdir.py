"""A run directory's consistency and failures: the config and dataset a workdir was trained with
(a resumed run must match them), and the one line a failed write ends in."""

import json

import jax
import numpy as np

from configs import schema
from data import corpus, storage
from model.config import ConfigError
from train import distributed
from train.checkpoint import Checkpointer

# Groups that must not change under an existing workdir (they define what the checkpoint is).
_FROZEN_GROUPS = ('model', *schema.MODEL_GROUPS, 'data')
# Fields that only change how fast batches arrive or how a kernel computes the same values (data
# loading, the attention kernel, the MoE grouped-matmul kernel and its blocks): free on resume.
_FREE_FIELDS = {
  'data': ('cache_dir', 'worker_count', 'prefetch', 'read_threads', 'verify'),
  'attention': ('impl',),
  'moe': ('gmm_impl', 'block_size'),
}


def check_dataset(workdir: str, dataset_dir: str) -> dict:
  """The dataset's identity; refuses one whose tokenizer or content differ from the workdir's."""
  meta = corpus.load_metadata(dataset_dir)
  ident = {
    'tokenizer': meta['tokenizer']['fingerprint'],
    'tokenizer_spec': meta['tokenizer']['spec'],
    'dataset': meta['fingerprint'],
    'path': storage.resolve(dataset_dir),
  }
  path = storage.join(workdir, 'dataset.json')
  if storage.exists(path):
    old = storage.read_json(path)
    for key, what in (('tokenizer', 'tokenizer'), ('dataset', 'dataset')):
      if old.get(key) != ident[key]:
        raise corpus.DataError(
          f'{workdir} was trained with {what} {old.get(key)} ({old.get("tokenizer_spec")}, '
          f'{old.get("path")}) but this run has {ident[key]} ({ident["tokenizer_spec"]}, '
          f'{ident["path"]}); use a new --workdir'
        )
  return ident


def write_config(cfg: schema.Config, workdir: str) -> None:
  """Writes DIR/config.json; refuses a workdir whose model or data differ from this config."""
  path = storage.join(workdir, 'config.json')
  new = cfg.to_dict()
  if storage.exists(path):
    # Fields added since then read as their defaults; JSON round trip makes tuples lists on both sides.
    old = json.loads(json.dumps(schema.from_dict(storage.read_json(path)).to_dict()))
    for group in _FROZEN_GROUPS:
      for field, value in new[group].items():
        if field in _FREE_FIELDS.get(group, ()):
          continue
        before = old.get(group, {}).get(field)
        if json.loads(json.dumps(value)) != before:
          raise ConfigError(
            f'{group}.{field}={value!r} but {workdir} was trained with {before!r}; '
            'use a new --workdir'
          )
  if jax.process_index() == 0:
    storage.write_json(path, new, indent=2)


def check_shared(workdir: str) -> None:
  """Refuses, in every process, a workdir that the processes of a multi-process run do not share
  (each host's own local disk): process 0 writes a marker with a fresh number, and every process
  must read that number back. Checked, not guessed from the path."""
  if jax.process_count() == 1:
    return
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top

  nonce = int(multihost_utils.broadcast_one_to_all(np.int32(np.random.randint(1, 2**31 - 1))))
  marker = storage.join(workdir, f'.shared-marker-{nonce}')
  if jax.process_index() == 0:
    storage.write_text(marker, str(nonce))
  distributed.barrier('workdir_marker_written')
  try:
    seen = storage.read_text(marker).strip() == str(nonce)
  except OSError:
    seen = False
  shared = distributed.all_processes(seen)
  if jax.process_index() == 0:
    storage.remove(marker)
  if not shared:
    raise storage.StorageError(
      f'{workdir}: the {jax.process_count()} processes of this run do not all see the same '
      f'files there (process {jax.process_index()} '
      f'{"does" if seen else "does not"} see the marker process 0 wrote); a multi-process run '
      'needs a workdir that every process shares: gs://BUCKET/PATH or a shared file system'
    )


def os_error_in(e: BaseException) -> OSError | None:
  """The OSError behind `e` (itself, or its chain of causes), if any."""
  seen = set()
  while e is not None and id(e) not in seen:
    if isinstance(e, OSError):
      return e
    seen.add(id(e))
    e = e.__cause__ or e.__context__
  return None


def describe_os_error(e: OSError, workdir: str) -> str:
  """One line for a failed write (ENOSPC, EROFS, ...): the path, the reason, and the newest
  complete checkpoint, which Orbax's write-then-rename leaves intact."""
  path = e.filename or getattr(e, 'filename2', None) or 'a file'
  try:
    latest = Checkpointer(workdir, schema.CheckpointConfig(), read_only=True).latest_step()
  except Exception:  # pylint: disable=broad-except  (the storage itself may be the problem)
    latest = None
  last = (
    f'last good checkpoint: step {latest} in {storage.join(workdir, "checkpoints")}'
    if latest is not None
    else 'no complete checkpoint yet'
  )
  return f'cannot write {path}: {e.strerror or e}; training stopped; {last}'
