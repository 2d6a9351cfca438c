"""A run directory's consistency and failures: the config and dataset a workdir was trained with
(a resumed run must match them), and the one line a failed write ends in."""

import json
import os

import jax

from configs import schema
from data import corpus
from model.config import ConfigError
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
    'path': os.path.abspath(dataset_dir),
  }
  path = os.path.join(workdir, 'dataset.json')
  if os.path.exists(path):
    with open(path) as f:
      old = json.load(f)
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
  path = os.path.join(workdir, 'config.json')
  new = cfg.to_dict()
  if os.path.exists(path):
    with open(path) as f:
      # Fields added since then read as their defaults; JSON round trip makes tuples lists on both sides.
      old = json.loads(json.dumps(schema.from_dict(json.load(f)).to_dict()))
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
    os.makedirs(workdir, exist_ok=True)
    with open(path + '.tmp', 'w') as f:
      json.dump(new, f, indent=2)
    os.replace(path + '.tmp', path)


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
    f'last good checkpoint: step {latest} in {os.path.join(workdir, "checkpoints")}'
    if latest is not None
    else 'no complete checkpoint yet'
  )
  return f'cannot write {path}: {e.strerror or e}; training stopped; {last}'
