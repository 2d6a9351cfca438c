"""Claim: with async checkpointing, a step during a save takes <= 1.2x a step without one.

Times each train step of the demo config (blocking per step), saving a checkpoint every
`--every` steps; compares the steps that overlap a save (the save call plus the steps until it is
finished) with the steps that do not, in one run.

Usage: python -m benchmarks.checkpoint_async [--steps=60] [--every=10]
"""

import statistics
import tempfile
import time

import jax
from absl import app, flags

from benchmarks import common
from configs import demo, schema, sharding
from data import corpus, pipeline
from train import mesh as mesh_lib
from train.checkpoint import Checkpointer
from train.step import make_step_fns

_STEPS = flags.DEFINE_integer('steps', 60, 'Timed steps.')
_EVERY = flags.DEFINE_integer('every', 10, 'Steps between checkpoints.')


def main(argv):
  del argv
  cfg = schema.load(demo.get_config('dense'), jax.device_count())
  fns = make_step_fns(cfg, mesh_lib.make_mesh(cfg.mesh), sharding.rules(cfg.mesh.rules))
  tokens = corpus.load_split(corpus.resolve_dataset(cfg.data), 'train')
  data = iter(
    pipeline.train_dataset(
      tokens,
      schema.DataConfig(),  # defaults: seed 0, windows, no workers
      seq_len=cfg.train.seq_len,
      global_batch_size=cfg.train.batch_size,
    )
  )
  state = fns.init()
  for _ in range(2):
    state, metrics = fns.train_step(
      state, pipeline.make_global_batch(next(data), fns.batch_sharding)
    )
  jax.block_until_ready(state)
  during, without = [], []
  with tempfile.TemporaryDirectory() as workdir:
    ckpt = Checkpointer(workdir, cfg.checkpoint)
    for step in range(1, _STEPS.value + 1):
      batch = pipeline.make_global_batch(next(data), fns.batch_sharding)
      t0 = time.perf_counter()
      saving = step % _EVERY.value == 0
      if saving:
        ckpt.save(step, state, data)
      state, metrics = fns.train_step(state, batch)
      jax.block_until_ready(state)
      elapsed = time.perf_counter() - t0
      in_flight = saving or ckpt.manager.is_saving_in_progress()
      (during if in_flight else without).append(elapsed)
    ckpt.close()
    state_bytes = sum(x.nbytes for x in jax.tree.leaves(state))
  ratio = statistics.mean(during) / statistics.mean(without)
  rows = [
    {'steps': 'with a save in flight', 'count': len(during), 'mean_s': statistics.mean(during)},
    {'steps': 'without', 'count': len(without), 'mean_s': statistics.mean(without)},
  ]
  common.print_table(rows)
  print(f'during / without = {ratio:.3f} (target <= 1.2); state {state_bytes / 2**20:.1f} MiB')
  path = common.write_result(
    'checkpoint_async',
    {
      'config': 'configs/demo.py:dense',
      'rows': rows,
      'ratio': ratio,
      'target': 1.2,
      'state_mib': state_bytes / 2**20,
      'async_save': cfg.checkpoint.async_save,
    },
  )
  print(f'wrote {path}')


if __name__ == '__main__':
  app.run(main)
