"""Claim: the full training loop runs at >= 0.95 of the bare jitted step's throughput.

Bare: `train_step` called back to back on one device-resident batch. Loop: `train.train` as a user
runs it (data pipeline, global batch assembly, metrics read one step late, logging, TensorBoard).
Both on the demo config, in one process.

Usage: python -m benchmarks.loop_overhead [--steps=30] [--rounds=3]
"""

import json
import os
import statistics
import tempfile
import time

import jax
from absl import app, flags

from benchmarks import common
from configs import demo, schema, sharding
from data import corpus, pipeline
from train import mesh as mesh_lib
from train.step import make_step_fns
from train.train import train_and_evaluate


def _define_flags() -> None:
  """The command-line flags, defined only when run as a program (importing this module defines
  none, so several benchmarks can be imported into one process)."""
  global _STEPS, _ROUNDS
  _STEPS = flags.DEFINE_integer('steps', 30, 'Timed steps of each run.')
  _ROUNDS = flags.DEFINE_integer('rounds', 3, 'Loop runs, each between two bare runs.')


def bare_tokens_per_sec(cfg, steps: int) -> float:
  step = common.bare_train_step(cfg)
  for _ in range(5):  # compile and warm up
    metrics = step()
  jax.block_until_ready(metrics)
  t0 = time.perf_counter()
  for _ in range(steps):
    metrics = step()
  jax.block_until_ready(metrics)
  return steps * cfg.train.batch_size * cfg.train.seq_len / (time.perf_counter() - t0)


def loop_tokens_per_sec(cfg, steps: int) -> float:
  with tempfile.TemporaryDirectory() as workdir:
    window = max(steps // 4, 1)
    run_cfg = schema.from_dict(
      {
        **cfg.to_dict(),
        'train': {**cfg.to_dict()['train'], 'steps': steps + 1, 'log_every': window},
      }
    )
    train_and_evaluate(run_cfg, workdir)
    with open(os.path.join(workdir, 'metrics.jsonl')) as f:
      records = [json.loads(line) for line in f]
  # Full logging windows; the loop itself keeps step 1 (compilation) out of its clock.
  step_times = [r['step_time'] for r in records if r['step'] % window == 0]
  return cfg.train.batch_size * cfg.train.seq_len * len(step_times) / sum(step_times)


def host_seconds_per_step(cfg, steps: int = 200) -> float:
  """The loop's own work per step with no compute: next batch, global batch assembly."""
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
  jax.block_until_ready(pipeline.make_global_batch(next(data), fns.batch_sharding))
  t0 = time.perf_counter()
  for _ in range(steps):
    batch = pipeline.make_global_batch(next(data), fns.batch_sharding)
  jax.block_until_ready(batch)
  return (time.perf_counter() - t0) / steps


def main(argv):
  del argv
  cfg = schema.load(demo.get_config('dense'), jax.device_count())
  steps = _STEPS.value
  # Alternate bare and loop runs; each loop run is compared with the bare runs on either side
  # of it, so drift of the machine's speed cancels. The median over rounds is the result.
  bares, loops = [bare_tokens_per_sec(cfg, steps)], []
  for _ in range(_ROUNDS.value):
    loops.append(loop_tokens_per_sec(cfg, steps))
    bares.append(bare_tokens_per_sec(cfg, steps))
  ratios = [loop / ((bares[i] + bares[i + 1]) / 2) for i, loop in enumerate(loops)]
  ratio = statistics.median(ratios)
  rows = [
    {
      'round': i,
      'bare_before': bares[i],
      'loop': loops[i],
      'bare_after': bares[i + 1],
      'ratio': ratios[i],
    }
    for i in range(len(loops))
  ]
  common.print_table(rows)
  host = host_seconds_per_step(cfg)
  step_seconds = cfg.train.batch_size * cfg.train.seq_len / statistics.mean(bares)
  print(
    f'host work per step (data + batch assembly): {1e3 * host:.2f} ms = '
    f'{100 * host / step_seconds:.2f}% of a {step_seconds:.3f} s step'
  )
  print(f'median loop / bare = {ratio:.3f} (target >= 0.95)')
  path = common.write_result(
    'loop_overhead',
    {
      'config': 'configs/demo.py:dense',
      'steps': steps,
      'rounds': _ROUNDS.value,
      'rows': rows,
      'ratio': ratio,
      'target': 0.95,
      'host_seconds_per_step': host,
      'step_seconds': step_seconds,
    },
  )
  print(f'wrote {path}')


if __name__ == '__main__':
  _define_flags()
  app.run(main)
