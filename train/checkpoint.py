"""Orbax checkpoints of the train state and the data iterator.

Items: `model` (parameters), `opt` (optimizer state) and `data` (grain iterator state, one file
per process), so evaluation restores only `model`. With several processes every process writes
its own array shards and its iterator state; Orbax writes the metadata from the primary process
and restores onto whatever mesh and process count the abstract state's shardings describe. Orbax writes each step into a temporary directory and renames it
when complete, so a half-written step is never listed and never chosen for restore.
"""

import json
import os
import re
import time

import grain
import jax
import orbax.checkpoint as ocp

from configs.schema import CheckpointConfig
from train import distributed


class Checkpointer:
  """A CheckpointManager under `workdir/checkpoints` keeping the newest `max_to_keep` steps."""

  def __init__(self, workdir: str, cfg: CheckpointConfig, *, read_only: bool = False):
    options = ocp.CheckpointManagerOptions(
      max_to_keep=cfg.max_to_keep,
      enable_async_checkpointing=cfg.async_save,
      create=not read_only,
      read_only=read_only,
    )
    self.directory = os.path.join(os.path.abspath(workdir), 'checkpoints')
    self.quarantine = os.path.join(os.path.abspath(workdir), 'checkpoints_damaged')
    self.manager = ocp.CheckpointManager(self.directory, options=options)

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self.manager.all_steps())

  def data_process_count(self, step: int) -> int | None:
    """How many processes wrote `step`'s data-iterator states (grain writes one file each)."""
    directory = os.path.join(self.directory, str(step), 'data')
    names = os.listdir(directory) if os.path.isdir(directory) else []
    counts = {
      int(m.group(1)) for m in map(re.compile(r'process_\d+-of-(\d+)\.json').match, names) if m
    }
    return counts.pop() if len(counts) == 1 else None

  def damage(self, step: int) -> str | None:
    """What is visibly wrong with `step` (items missing, unreadable metadata or iterator states),
    or None. It reads the same files in every process (no collectives), so all processes agree
    before a restore starts; damage inside the array data shows during the restore itself."""
    root = os.path.join(self.directory, str(step))
    for item in ('model', 'opt'):
      if not os.path.isfile(os.path.join(root, item, '_METADATA')):
        return f'{item}/_METADATA is missing'
    count = self.data_process_count(step)
    data_dir = os.path.join(root, 'data')
    if (
      count is None
      and os.path.isdir(data_dir)
      and any(n.endswith('.json') for n in os.listdir(data_dir))
    ):
      return 'data/ holds no consistent set of iterator states'
    # No iterator state at all (a converted checkpoint): the stream is repositioned by step.
    for name in [f'{item}/_METADATA' for item in ('model', 'opt')] + [
      f'data/process_{i}-of-{count}.json' for i in range(count or 0)
    ]:
      try:
        with open(os.path.join(root, name)) as f:
          json.load(f)
      except (OSError, ValueError) as e:
        return f'{name} does not read ({type(e).__name__})'
    return None

  def move_aside(self, step: int) -> str:
    """Moves a damaged step out of the checkpoint directory (kept for inspection under
    `checkpoints_damaged/`) so that it is never chosen again; returns where it went."""
    target = os.path.join(self.quarantine, f'{step}-{time.strftime("%Y%m%d-%H%M%S")}')
    if jax.process_index() == 0:
      os.makedirs(self.quarantine, exist_ok=True)
      os.replace(os.path.join(self.directory, str(step)), target)
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
