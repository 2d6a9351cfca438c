"""The bare train step with glibc's large blocks on huge pages against glibc's defaults (issue 22).

XLA:CPU allocates each step's scratch buffer anew (418 MB at the demo shape); with glibc's
defaults the block is mapped afresh each step and faulted in 4 KB page by page. CPU-only commands
therefore restart once with `GLIBC_TUNABLES=glibc.malloc.hugetlb=1` (configs/cli.py:
`huge_pages_environment`). This script runs the same step in two worker processes, one started with
ROUTED_HOST_MEMORY=huge_pages and one with ROUTED_HOST_MEMORY=system, taking turns for --rounds
rounds of --steps steps. Per worker it reports the step time (median, min), minor page faults,
kernel and user CPU seconds per step and the peak resident memory. It also checks that both
workers end with the same loss, bit for bit.

Usage: python -m benchmarks.host_memory [--shape=demo|large] [--moe] [--rounds=5] [--steps=10]
       [--smoke]
Hardware: Linux with glibc >= 2.35 and transparent huge pages on 'madvise' (elsewhere both workers
run glibc's defaults, and the script says so). About two minutes on 2 CPU cores at the demo
shape. Writes benchmarks/results/host_memory_<shape>[_moe].json (--smoke: toy size, writes
nowhere).
"""

import json
import os
import resource
import statistics
import sys
import time

import jax
import numpy as np
from absl import app, flags

from benchmarks import common, peer_protocol, peer_step
from benchmarks import step_roofline as sr
from configs import cli, demo

MODES = ('huge_pages', 'system')


def library_dots() -> bool:
  """Whether this process's XLA:CPU hands a matrix multiply to a library fusion (YNNPACK)."""
  a = jax.numpy.ones((64, 64))
  return '__ynn_fusion' in jax.jit(lambda x, y: x @ y).lower(a, a).compile().as_text()


def _serve(shape: str, moe: bool) -> None:
  """Worker: build and warm the step, then answer {"steps": n} lines with times and rusage."""
  proto = peer_protocol.protocol_stream()
  _, fns, batch = sr.random_batch_step(sr.build_config(demo.get_config(), shape, moe))
  state, loss = [fns.init()], [None]

  def run():
    state[0], metrics = fns.train_step(state[0], batch)
    loss[0] = jax.block_until_ready(metrics)['loss']

  for _ in range(4):
    run()
  ready = {
    'tunables': os.environ.get('GLIBC_TUNABLES', ''), 'pid': os.getpid(),
    'xla_flags': os.environ.get('XLA_FLAGS', ''), 'library_dots': library_dots(),
  }  # fmt: skip
  proto.write(json.dumps(ready) + '\n')
  proto.flush()
  for line in sys.stdin:
    n = json.loads(line).get('steps')
    if not n:
      return
    before, times = resource.getrusage(resource.RUSAGE_SELF), []
    for _ in range(n):
      t0 = time.perf_counter()
      run()
      times.append(time.perf_counter() - t0)
    after = resource.getrusage(resource.RUSAGE_SELF)
    reply = {
      'times': times,
      'minflt': after.ru_minflt - before.ru_minflt,
      'sys_s': after.ru_stime - before.ru_stime,
      'user_s': after.ru_utime - before.ru_utime,
      'max_rss_mb': after.ru_maxrss / 1024,
      'loss': float(np.asarray(loss[0])),
    }
    proto.write(json.dumps(reply) + '\n')
    proto.flush()


def take_turns(workers: dict, shape: str, rounds: int, steps: int) -> tuple[dict, dict]:
  """One step-serving worker per entry of `workers` (name: (moe, environment)), taking turns (the
  order rotates each round): each worker's ready message and its replies, by name."""
  argv = [sys.executable, '-m', 'benchmarks.host_memory', f'--worker_shape={shape}']
  started, replies = {}, {name: [] for name in workers}
  names = list(workers)
  try:
    for name, (moe, env) in workers.items():
      started[name] = peer_step.Worker(name, argv + ['--moe'] * moe, env)
    for r in range(rounds):
      for name in names[r % len(names) :] + names[: r % len(names)]:
        replies[name].append(started[name].request(steps))
  finally:
    for w in started.values():
      w.close()
  return {name: w.info for name, w in started.items()}, replies


def summary(rs: list[dict]) -> dict:
  """Step times and rusage per step over a worker's replies."""
  times = [t for r in rs for t in r['times']]
  n = len(times)
  return {
    'median_s': statistics.median(times), 'min_s': min(times), 'steps': n,
    'page_faults_per_step': sum(r['minflt'] for r in rs) / n,
    'kernel_s_per_step': sum(r['sys_s'] for r in rs) / n,
    'user_s_per_step': sum(r['user_s'] for r in rs) / n,
    'max_rss_mb': max(r['max_rss_mb'] for r in rs), 'final_loss': rs[-1]['loss'],
  }  # fmt: skip


def run(shape: str, moe: bool, rounds: int, steps: int) -> dict:
  """Both workers, taking turns; the result as one dict."""
  base = {k: v for k, v in os.environ.items() if k != 'GLIBC_TUNABLES'}
  workers = {mode: (moe, dict(base, **{cli.HOST_MEMORY_ENV: mode})) for mode in MODES}
  info, replies = take_turns(workers, shape, rounds, steps)
  per_mode = {
    mode: dict(tunables=info[mode]['tunables'], **summary(rs)) for mode, rs in replies.items()
  }
  huge, system = per_mode['huge_pages'], per_mode['system']
  return {
    'shape': shape, 'moe': moe, 'rounds': rounds, 'steps_per_round': steps,
    'modes': per_mode,
    'huge_pages_over_system': huge['median_s'] / system['median_s'],
    'same_final_loss': huge['final_loss'] == system['final_loss'],
    'huge_pages_in_effect': cli.HUGE_PAGES_TUNABLE in huge['tunables'],
    'method': ('two worker processes run the bare jitted train step on one fixed random batch, '
               'taking turns (order alternating per round); rusage deltas over the timed steps'),
  }  # fmt: skip


def _define_flags() -> None:
  global _SHAPE, _MOE, _ROUNDS, _STEPS, _SMOKE, _WORKER
  _SHAPE = flags.DEFINE_string('shape', 'demo', 'Model shape: demo | large.')
  _MOE = flags.DEFINE_bool('moe', False, '8 experts top-2 of width mlp / 2, dropless.')
  _ROUNDS = flags.DEFINE_integer('rounds', 5, 'Rounds; each worker runs --steps steps per round.')
  _STEPS = flags.DEFINE_integer('steps', 10, 'Timed steps per worker per round.')
  _SMOKE = flags.DEFINE_bool('smoke', False, 'Toy size, 1 round of 2 steps; writes nothing.')
  _WORKER = flags.DEFINE_string('worker_shape', None, 'Internal: run as a worker at this shape.')


def main(argv):
  del argv
  if _WORKER.value:
    _serve(_WORKER.value, _MOE.value)
    return
  shape = 'smoke' if _SMOKE.value else _SHAPE.value
  try:
    if shape not in sr.SHAPES:
      raise ValueError(f'unknown shape {shape!r}; known: demo, large')
    result = run(shape, _MOE.value, 1 if _SMOKE.value else _ROUNDS.value,
                 2 if _SMOKE.value else _STEPS.value)  # fmt: skip
  except (ValueError, peer_step.PeerError) as e:
    print(f'host_memory: {e}', file=sys.stderr)
    sys.exit(1)
  rows = [{'malloc': mode, 'median_ms': round(m['median_s'] * 1e3, 1),
           'min_ms': round(m['min_s'] * 1e3, 1), 'faults/step': round(m['page_faults_per_step']),
           'kernel_s/step': round(m['kernel_s_per_step'], 3),
           'max_rss_MB': round(m['max_rss_mb']), 'final_loss': m['final_loss']}
          for mode, m in result['modes'].items()]  # fmt: skip
  print(
    f'bare train step, shape {shape}{" MoE" if _MOE.value else ""}, on {common.device_description()}: '
    f'{result["rounds"]} rounds of {result["steps_per_round"]} synchronised steps per worker'
  )
  common.print_table(rows)
  print(f'huge_pages / system: {result["huge_pages_over_system"]:.2f}x; '
        f'same final loss: {result["same_final_loss"]}')  # fmt: skip
  if not result['huge_pages_in_effect']:
    print('note: huge pages were not in effect here (glibc < 2.35 or THP not on madvise)')
  if not _SMOKE.value:
    result['command'] = 'python -m benchmarks.host_memory ' + ' '.join(sys.argv[1:])
    name = f'host_memory_{shape}' + ('_moe' if _MOE.value else '')
    print(f'wrote {common.write_result(name, result)}')


if __name__ == '__main__':
  _define_flags()
  app.run(main)
