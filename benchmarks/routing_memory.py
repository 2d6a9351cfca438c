"""Claim: the Routing Transformer's layout (non_routing='local') trains in memory linear in L.

The whole training step, not one op: for each model and sequence length L, `python -m
train.train` runs `--steps` steps of `configs/routing_transformer.py` in a fresh subprocess, and
this script reads that child's peak resident memory (`ru_maxrss` of `os.wait4` on it: the whole
process, so it includes the Python runtime, XLA compilation and the training corpus, a constant of
a few hundred MiB) and the median `step_time` of its metrics.jsonl (steps 2.., the first compiles).

Models, both at the same size (overrides of the config, in `OVERRIDES`): width 64, 4 layers, 4
heads of 16 (no GQA), SwiGLU width 256, f32 compute, batch 1, window and local window 256:
- `routing`: configs/routing_transformer.py as it is: routing heads in the last two layers, only
  local heads in the first two (`attention.non_routing='local'`, the paper's layout);
- `dense`: the same file with `attention.kind=dense` (full causal attention in every layer);
- `routing_dense` (opt-in): the earlier layout, `attention.non_routing=dense`.

A point is skipped, with its reason recorded, when the model already ran out of memory at a
shorter L or when its peak predicted from its last two points (fitted power law) exceeds
`--max_gib`; a child whose resident memory passes `--max_gib` is killed and recorded as "failed:
out of memory", so the shared machine never swaps or OOMs.

Usage: python -m benchmarks.routing_memory [--lengths=1024,2048,4096,8192,16384]
       [--models=routing,dense] [--steps=4] [--max_gib=14]
"""

import json
import math
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time

from absl import app, flags

from benchmarks import common

_LENGTHS = flags.DEFINE_list(
  'lengths', ['1024', '2048', '4096', '8192', '16384'], 'Sequence lengths.'
)
_MODELS = flags.DEFINE_list(
  'models', ['routing', 'dense'], 'Models to measure: routing, dense, routing_dense.'
)
_STEPS = flags.DEFINE_integer('steps', 4, 'Training steps per child run (step 1 compiles).')
_WINDOW = flags.DEFINE_integer('window', 256, 'attention.window and attention.local_window.')
_MAX_GIB = flags.DEFINE_float(
  'max_gib',
  14.0,
  'Resident memory at which a child is killed, and above which a predicted point is skipped.',
)
_TIMEOUT = flags.DEFINE_integer('timeout', 1800, 'Seconds before a child is killed.')

CONFIG = 'configs/routing_transformer.py'
# The model size of every point (flag overrides of CONFIG, besides seq_len and the window).
OVERRIDES = {
  'model.d_model': 64,
  'model.num_layers': 4,
  'model.num_heads': 4,
  'model.num_kv_heads': 4,
  'model.mlp_dim': 256,
  'model.dtype': 'float32',
  'train.batch_size': 1,
  'train.log_every': 1,
  'train.peak_tflops': 0.0,
  'optimizer.warmup_steps': 1,
  'checkpoint.async_save': False,
}
MODELS = {
  'routing': {},
  'dense': {'attention.kind': 'dense'},
  'routing_dense': {'attention.non_routing': 'dense'},
}
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _env() -> dict:
  """The child's environment: CPU, one device (no forced fake device count)."""
  env = dict(os.environ, JAX_PLATFORMS='cpu')
  flags_ = [
    f
    for f in env.get('XLA_FLAGS', '').split()
    if not f.startswith('--xla_force_host_platform_device_count')
  ]
  env['XLA_FLAGS'] = ' '.join(flags_)
  return env


def _rss_kib(pid: int) -> int:
  try:
    with open(f'/proc/{pid}/status') as f:
      for line in f:
        if line.startswith('VmRSS:'):
          return int(line.split()[1])
  except OSError:
    pass
  return 0


def run_child(argv: list[str], max_kib: int, timeout: float) -> dict:
  """Runs argv; {'returncode', 'peak_kib' (ru_maxrss), 'killed' (None | 'memory' | 'timeout'),
  'wall_s', 'stderr_tail'}. Polls the resident set and kills the child above `max_kib`."""
  t0 = time.perf_counter()
  with tempfile.TemporaryFile() as err:
    proc = subprocess.Popen(argv, cwd=_ROOT, env=_env(), stdout=subprocess.DEVNULL, stderr=err)
    killed = None
    while True:
      pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
      if pid:
        break
      if killed is None and _rss_kib(proc.pid) > max_kib:
        killed = 'memory'
      elif killed is None and time.perf_counter() - t0 > timeout:
        killed = 'timeout'
      if killed:
        os.kill(proc.pid, signal.SIGKILL)
        pid, status, usage = os.wait4(proc.pid, 0)
        break
      time.sleep(0.05)
    proc.returncode = os.waitstatus_to_exitcode(status)  # reaped here, not by Popen
    err.seek(0)
    tail = err.read().decode(errors='replace').strip().splitlines()[-3:]
  return {
    'returncode': proc.returncode,
    'peak_kib': usage.ru_maxrss,
    'killed': killed,
    'wall_s': time.perf_counter() - t0,
    'stderr_tail': tail,
  }


def _argv(model: str, seq_len: int, workdir: str) -> list[str]:
  overrides = {
    **OVERRIDES,
    'train.seq_len': seq_len,
    'train.steps': _STEPS.value,
    'attention.window': _WINDOW.value,
    'attention.local_window': _WINDOW.value,
    **MODELS[model],
  }
  return [
    sys.executable,
    '-m',
    'train.train',
    f'--config={CONFIG}',
    f'--workdir={workdir}',
    *(f'--config.{k}={v}' for k, v in overrides.items()),
  ]


def _step_times(workdir: str) -> list[float]:
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    records = [json.loads(line) for line in f]
  return [r['step_time'] for r in records if 'step_time' in r and r['step'] >= 2]


def _skip_reason(done: list[dict], seq_len: int, max_mib: float) -> str | None:
  """Why a point should not run, from this model's earlier points (shorter L)."""
  if any(r['status'].startswith('failed: out of memory') for r in done):
    return 'skipped: out of memory at a shorter L'
  ok = [r for r in done if r['status'] == 'ok']
  if len(ok) < 2:
    return None
  a, b = ok[-2], ok[-1]
  exponent = math.log(b['peak_MiB'] / a['peak_MiB']) / math.log(b['L'] / a['L'])
  predicted = b['peak_MiB'] * (seq_len / b['L']) ** exponent
  if predicted > max_mib:
    return (
      f'skipped: predicted {predicted / 1024:.1f} GiB (L^{exponent:.2f} from L={a["L"]}, '
      f'{b["L"]}) > --max_gib={_MAX_GIB.value:g}'
    )
  return None


def measure(model: str, seq_len: int, done: list[dict]) -> dict:
  row = {
    'model': model,
    'L': seq_len,
    'peak_MiB': None,
    'step_s': None,
    'steps_timed': 0,
    'child_wall_s': None,
    'status': 'ok',
  }
  max_mib = _MAX_GIB.value * 1024
  reason = _skip_reason(done, seq_len, max_mib)
  if reason:
    row['status'] = reason
    return row
  with tempfile.TemporaryDirectory(prefix='routing_memory_') as workdir:
    out = run_child(_argv(model, seq_len, workdir), int(max_mib * 1024), _TIMEOUT.value)
    row['child_wall_s'] = out['wall_s']
    if out['killed'] == 'memory':
      row['status'] = f'failed: out of memory (resident set above --max_gib={_MAX_GIB.value:g})'
    elif out['killed'] == 'timeout':
      row['status'] = f'failed: timeout after {_TIMEOUT.value} s'
    elif out['returncode'] != 0:
      row['status'] = f'failed: exit {out["returncode"]}: ' + ' | '.join(out['stderr_tail'])
    else:
      row['peak_MiB'] = out['peak_kib'] / 1024
      times = _step_times(workdir)
      row['step_s'] = statistics.median(times) if times else None
      row['steps_timed'] = len(times)
  return row


def _prepare_corpus() -> None:
  """Prepares the default corpus once, so that no measured child pays for it."""
  code = (
    'from configs import schema; from data import corpus; '
    'corpus.resolve_dataset(schema.DataConfig())'
  )
  subprocess.run([sys.executable, '-c', code], cwd=_ROOT, env=_env(), check=True)


def main(_):
  _prepare_corpus()
  lengths = sorted(map(int, _LENGTHS.value))
  rows = []
  for model in _MODELS.value:
    if model not in MODELS:
      raise app.UsageError(f'--models: unknown model {model!r}; expected one of {list(MODELS)}')
    done = []
    for seq_len in lengths:
      row = measure(model, seq_len, done)
      done.append(row)
      rows.append(row)
      common.print_table([row])
  common.print_table(rows)
  peak = {(r['model'], r['L']): r['peak_MiB'] for r in rows}
  ratios = {
    m: (peak[(m, 8192)] / peak[(m, 4096)] if peak.get((m, 8192)) and peak.get((m, 4096)) else None)
    for m in _MODELS.value
  }
  print('peak(8k) / peak(4k):', ratios)
  path = common.write_result(
    'routing_memory',
    {
      'config': CONFIG,
      'overrides': OVERRIDES,
      'models': {m: MODELS[m] for m in _MODELS.value},
      'window': _WINDOW.value,
      'steps': _STEPS.value,
      'max_gib': _MAX_GIB.value,
      'peak': 'ru_maxrss of the train.train child (os.wait4): the whole process',
      'step_s': 'median metrics.jsonl step_time of steps >= 2',
      'command': 'python -m benchmarks.routing_memory ' + ' '.join(sys.argv[1:]),
      'rows': rows,
      'peak_8k_over_4k': ratios,
      'targets': {'routing peak_8k_over_4k': '<= 2.4'},
    },
  )
  print(path)


if __name__ == '__main__':
  app.run(main)
