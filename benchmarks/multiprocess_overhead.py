"""Claim: the multi-controller path (2 processes x 4 devices) costs little over 1 process x 8.

Both runs train the same config for the same steps on the same 8 CPU devices of this machine,
as subprocesses (`python -m train.train`, the 2-process one through `python -m train.launch` with
gloo collectives between the processes); the step time is the median of the logged windows after
the first (compilation). On one machine the cross-process collectives go through localhost TCP,
so this bounds the overhead of the multi-process runtime, not a real network.

Usage: python -m benchmarks.multiprocess_overhead [--config=configs/demo.py:dense] [--steps=60]
"""

import os
import statistics
import subprocess
import sys
import tempfile

from absl import app, flags

from benchmarks import common
from eval import routing_report

_CONFIG = flags.DEFINE_string('config', 'configs/demo.py:dense', 'Experiment config.')
_STEPS = flags.DEFINE_integer('steps', 60, 'Training steps of each run.')
_LOG = flags.DEFINE_integer('log_every', 10, 'Steps per timed window.')


def _run(processes: int, workdir: str) -> float:
  train = [
    sys.executable,
    '-m',
    'train.train',
    f'--config={_CONFIG.value}',
    f'--workdir={workdir}',
    f'--config.train.steps={_STEPS.value}',
    f'--config.train.log_every={_LOG.value}',
    f'--config.checkpoint.every_steps={_STEPS.value}',
    '--config.mesh.shape=(-1,1,1,1)',
    '--config.mesh.rules=dp',
  ]
  env = dict(os.environ, JAX_PLATFORMS='cpu')
  if processes == 1:
    env['XLA_FLAGS'] = '--xla_force_host_platform_device_count=8'
    command = train
  else:
    command = [
      sys.executable,
      '-m',
      'train.launch',
      f'--num_processes={processes}',
      f'--devices_per_process={8 // processes}',
      '--',
      *train,
    ]
  subprocess.run(command, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  times = [r['step_time'] for r in routing_report.read_metrics(workdir)][1:]
  return statistics.median(times)


def main(argv):
  del argv
  rows = []
  with tempfile.TemporaryDirectory() as root:
    one = _run(1, os.path.join(root, 'one'))
    two = _run(2, os.path.join(root, 'two'))
  rows.append({'config': _CONFIG.value, 'step_s_1x8': one, 'step_s_2x4': two, 'ratio': two / one})
  common.print_table(rows)
  print(common.write_result('multiprocess_overhead', {'steps': _STEPS.value, 'rows': rows}))


if __name__ == '__main__':
  app.run(main)
