"""Orbax checkpoints of the train state and the data iterator.

Items: `model` (parameters), `opt` (optimizer state) and `data` (grain iterator state, one file
per process), so evaluation restores only `model`. With several processes every process writes
its own array shards and its iterator state; Orbax writes the metadata from the primary process
and restores onto whatever mesh and process count the abstract state's shardings describe. Orbax writes each step into a temporary directory and renames it
when complete, so a half-written step is never listed and never chosen for restore.
"""

import re
import time

import grain
import jax
import orbax.checkpoint as ocp

from configs.schema import CheckpointConfig
from data import storage
from train import distributed


def check_location(workdir: str) -> str:
  """The canonical workdir, refused in one line where Orbax cannot write checkpoints."""
  workdir = storage.resolve(workdir)
  if storage.scheme(workdir) == 's3':
    raise storage.StorageError(
      f'{workdir}: checkpoints cannot be written to s3:// (Orbax writes arrays only to local '
      'paths and gs://); use gs://BUCKET/PATH or a local --workdir'
    )
  return workdir


class Checkpointer:
  """A CheckpointManager under `workdir/checkpoints` keeping the newest `max_to_keep` steps."""

  def __init__(self, workdir: str, cfg: CheckpointConfig, *, read_only: bool = False):
    options = ocp.CheckpointManagerOptions(
      max_to_keep=cfg.max_to_keep,
      enable_async_checkpointing=cfg.async_save,
      create=not read_only,
      read_only=read_only,
    )
    workdir = check_location(workdir)
    self.directory = storage.join(workdir, 'checkpoints')
    self.quarantine = storage.join(workdir, 'checkpoints_damaged')
    self.manager = ocp.CheckpointManager(self.directory, options=options)

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self.manager.all_steps())

  def data_process_count(self, step: int) -> int | None:
    """How many processes wrote `step`'s data-iterator states (grain writes one file each)."""
    names = storage.listdir(storage.join(self.directory, str(step), 'data'))
    counts = {
      int(m.group(1)) for m in map(re.compile(r'process_\d+-of-(\d+)\.json').match, names) if m
    }
    return counts.pop() if len(counts) == 1 else None

  def damage(self, step: int) -> str | None:
    """What is visibly wrong with `step` (items missing, unreadable metadata or iterator states),
    or None. It reads the same files in every process (no collectives), so all processes agree
    before a restore starts; damage inside the array data shows during the restore itself."""
    root = storage.join(self.directory, str(step))
    for item in ('model', 'opt'):
      if not storage.isfile(storage.join(root, item, '_METADATA')):
        return f'{item}/_METADATA is missing'
    count = self.data_process_count(step)
    if count is None and any(
      n.endswith('.json') for n in storage.listdir(storage.join(root, 'data'))
    ):
      return 'data/ holds no consistent set of iterator states'
    # No iterator state at all (a converted checkpoint): the stream is repositioned by step.
    for name in [f'{item}/_METADATA' for item in ('model', 'opt')] + [
      f'data/process_{i}-of-{count}.json' for i in range(count or 0)
    ]:
      try:
        storage.read_json(storage.join(root, name))
      except (OSError, ValueError) as e:
        return f'{name} does not read ({type(e).__name__})'
    return None

  def move_aside(self, step: int) -> str:
    """Moves a damaged step out of the checkpoint directory (kept for inspection under
    `checkpoints_damaged/`) so that it is never chosen again; returns where it went."""
    target = storage.join(self.quarantine, f'{step}-{time.strftime("%Y%m%d-%H%M%S")}')
    if jax.process_index() == 0:
      storage.makedirs(self.quarantine)
      storage.move(storage.join(self.directory, str(step)), target)
    distributed.barrier(f'checkpoint_moved_aside_{step}')  # every process then sees it gone
    self.manager.reload()
    return target

  def save(self, step: int, state: dict, data_iterator=None) -> bool:
    items = {
      'model': ocp.args.StandardSave(state['model']),
      'opt': ocp.args.StandardSave(state['opt']),
    }
    if data_iterator is not None:
      items['data'] = grain.checkpoint.CheckpointSave(data_iterator)
    return self.manager.save(step, args=ocp.args.Composite(**items), force=True)

  def restore(self, step: int, abstract_state: dict, data_iterator=None) -> dict:
    """Restores `step` onto the shardings carried by `abstract_state` (and the iterator in place)."""
    items = {
      'model': ocp.args.StandardRestore(abstract_state['model']),
      'opt': ocp.args.StandardRestore(abstract_state['opt']),
    }
    if data_iterator is not None:
      items['data'] = grain.checkpoint.CheckpointRestore(data_iterator)
    restored = self.manager.restore(step, args=ocp.args.Composite(**items))
    return {'model': restored['model'], 'opt': restored['opt']}

  def restore_model(self, step: int, abstract_model_state):
    restored = self.manager.restore(
      step, args=ocp.args.Composite(model=ocp.args.StandardRestore(abstract_model_state))
    )
    return restored['model']

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()
