"""Claim: the grain pipeline feeds tokens >= 20x faster than the demo trainer consumes them, and
windows reach >= 2M tokens/s on one core.

Reads batches of configs/demo.py's shape (16 x 256) from the default corpus in TensorStore
(windows, and packed documents with segment ids/positions/weights), in the consuming thread
(read_threads=0, one core), and times the demo's bare jitted train step on the same machine in the
same run. Also reports a GPU-sized shape (64 x 1024), and the cost of the crc32c that every read
checks (against the first shard stored without it).

Usage: python -m benchmarks.data_pipeline
"""

import os
import time

import jax

from benchmarks.common import print_table, write_result
from configs import demo, schema, sharding
from data import corpus, pipeline, sources
from train import mesh as mesh_lib
from train.step import make_step_fns


def pipeline_rate(split, *, packing: bool, batch: int, seq_len: int, seconds: float = 3.0) -> float:
  it = iter(
    pipeline.train_dataset(
      split,
      schema.DataConfig(packing=packing),
      seq_len=seq_len,
      global_batch_size=batch,
    )
  )
  for _ in range(5):
    next(it)
  n, t0 = 0, time.perf_counter()
  while time.perf_counter() - t0 < seconds:
    next(it)
    n += 1
  return n * batch * seq_len / (time.perf_counter() - t0)


def checksum_cost(split, rounds: int = 3) -> dict:
  """Window read rate of the first shard of `split` stored with a crc32c per 4 Ki-token chunk
  (checked on read, as prepare stores it) and without, alternating, best of `rounds` each."""
  import tempfile  # pylint: disable=g-import-not-at-top

  tokens = split.tokens[: sources.SHARD_TOKENS]
  rates = {'crc32c': [], 'plain': []}
  with tempfile.TemporaryDirectory() as tmp:
    arrays = {}
    for name in rates:
      path = os.path.join(tmp, name)
      store = sources.create_token_array(path, tokens.size, tokens.dtype, crc32c=name == 'crc32c')
      store.write(tokens).result()
      arrays[name] = sources.TokenArray(path)
    for _ in range(rounds):
      for name, array in arrays.items():
        rates[name].append(pipeline_rate(array, packing=False, batch=16, seq_len=256, seconds=2.0))
  best = {k: max(v) for k, v in rates.items()}
  return {
    **{f'{k}_tokens_per_s': v for k, v in best.items()},
    'crc32c_over_plain': best['crc32c'] / best['plain'],
  }


def trainer_rate(steps: int = 6) -> float:
  cfg = schema.load(demo.get_config('dense'), jax.device_count())
  fns = make_step_fns(cfg, mesh_lib.make_mesh(cfg.mesh), sharding.rules(cfg.mesh.rules))
  split = sources.open_split(corpus.resolve_dataset(cfg.data), 'train')
  it = iter(
    pipeline.train_dataset(
      split,
      schema.DataConfig(),  # defaults: seed 0, windows, no workers
      seq_len=cfg.train.seq_len,
      global_batch_size=cfg.train.batch_size,
    )
  )
  batches = [pipeline.make_global_batch(next(it), fns.batch_sharding) for _ in range(steps + 1)]
  state = fns.init()
  state, m = fns.train_step(state, batches[0])  # compile
  jax.block_until_ready(m)
  t0 = time.perf_counter()
  for b in batches[1:]:
    state, m = fns.train_step(state, b)
  jax.block_until_ready(m)
  return steps * cfg.train.batch_size * cfg.train.seq_len / (time.perf_counter() - t0)


def main():
  split = sources.open_split(corpus.resolve_dataset(schema.DataConfig()), 'train')
  trainer = trainer_rate()
  rows = []
  for batch, seq_len in ((16, 256), (64, 1024)):
    for packing in (False, True):
      rate = pipeline_rate(split, packing=packing, batch=batch, seq_len=seq_len)
      rows.append(
        {
          'mode': 'packing' if packing else 'windows',
          'batch': batch,
          'seq_len': seq_len,
          'tokens_per_s': rate,
          'x_demo_trainer': rate / trainer,
        }
      )
  print_table(rows)
  print(f'demo trainer (bare jitted step, 16 x 256): {trainer:,.0f} tokens/s')
  crc = checksum_cost(split)
  print(
    f'windows 16 x 256 with crc32c checked on read: {crc["crc32c_over_plain"]:.2f}x the rate '
    f'of the same tokens stored without it'
  )
  path = write_result(
    'data_pipeline',
    {
      'trainer_tokens_per_s': trainer,
      'rows': rows,
      'checksum': crc,
      'read_threads': 0,
      'load_average_1min': os.getloadavg()[0],
      'min_x_trainer': min(r['x_demo_trainer'] for r in rows),
      'windows_demo_shape_tokens_per_s': rows[0]['tokens_per_s'],
      'targets': {'x_trainer': 20, 'windows_tokens_per_s': 2e6},
    },
  )
  print(f'wrote {path}')


if __name__ == '__main__':
  main()
