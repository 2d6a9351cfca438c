"""Our bare train step beside PyTorch's and nanodo's, in one interleaved run (issue 22, item 3).

Three systems at the same shapes and FLOPs on the same machine: ours (the jitted step exactly as
benchmarks/step_roofline.py builds it; worker in benchmarks/peer_jax.py), Hugging Face Llama /
Mixtral under torch.compile (benchmarks/peer_torch.py, run in .venv-hf) and, with --nanodo_src, nanodo's TransformerDo with a
GELU MLP of width 1.5 x our SwiGLU width (equal FLOPs) and an optax AdamW step. Each system is a
persistent worker subprocess that compiles and warms up first (time to first step reported on
its own); then, in each of --rounds rounds, each worker in turn runs --steps synchronised steps
while the others wait idle on stdin. Why: a step time means little without a peer measured on
the same CPU at the same moment. Reported: median and min step time, and our median / theirs.

Usage: python -m benchmarks.peer_step [--shape=demo|large] [--moe] [--rounds=5] [--steps=20]
       [--nanodo_src=DIR] [--torch_python=.venv-hf/bin/python] [--smoke]
Hardware: any CPU host; on 2 cores the demo shape takes a few minutes (torch.compile's warm-up
is most of it). Writes benchmarks/results/peer_step_<shape>[_moe].json (--smoke: a toy size,
1 round of 2 steps, writes nothing). `make hf-check` builds .venv-hf once.
"""

import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

import flax
import jax
import jaxlib
from absl import app, flags

from benchmarks import common
from benchmarks import step_roofline as sr
from configs import cli, demo, schema
from model import plan

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TORCH_WORKER = os.path.join(ROOT, 'benchmarks', 'peer_torch.py')
_HF_HINT = 'run `make hf-check` once (it builds .venv-hf with torch and transformers)'


class PeerError(Exception):
  """The comparison cannot run (bad flag, missing environment, a crashed worker): one line."""


def resolve_shape(shape: str, moe: bool):
  """Our config at `shape` (step_roofline's build), or a one-line PeerError."""
  try:
    return sr.build_config(demo.get_config(), shape, moe)
  except (sr.Unmeasurable, schema.ConfigError) as e:
    raise PeerError(str(e)) from None


def check_torch_python(path: str) -> dict:
  """{torch, transformers} versions of the interpreter at `path`, or a one-line PeerError."""
  if not (os.path.isfile(path) and os.access(path, os.X_OK)):
    raise PeerError(f'--torch_python {path}: no such interpreter; {_HF_HINT}')
  code = 'import json, torch, transformers; print(json.dumps({"torch": torch.__version__, '
  code += '"transformers": transformers.__version__}))'
  p = subprocess.run([path, '-c', code], capture_output=True, text=True, timeout=300, check=False)
  if p.returncode:
    last = (p.stderr.strip().splitlines() or ['?'])[-1]
    raise PeerError(f'--torch_python {path} lacks torch/transformers ({last}); {_HF_HINT}')
  return json.loads(p.stdout.strip().splitlines()[-1])


def check_nanodo(src: str) -> str | None:
  """The git commit of the nanodo checkout at `src` (None if not a git work tree), or PeerError."""
  model_py = os.path.join(src, 'nanodo', 'model.py')
  if not os.path.isfile(model_py) or 'class TransformerDo' not in open(model_py).read():
    raise PeerError(f'--nanodo_src {src}: not a nanodo checkout (no nanodo/model.py TransformerDo)')
  p = subprocess.run(['git', '-C', src, 'rev-parse', 'HEAD'], capture_output=True, text=True,
                     check=False)  # fmt: skip
  return p.stdout.strip() if p.returncode == 0 else None


def spec_of(cfg) -> dict:
  """The numbers every worker builds its model and optimizer from."""
  m, o, t = cfg.model, cfg.optimizer, cfg.train
  return dict(
    d=m.d_model, layers=m.num_layers, heads=m.num_heads, mlp=m.mlp_dim, vocab=m.vocab_size,
    seq=t.seq_len, batch=t.batch_size, moe=bool(cfg.moe.num_experts), rope_theta=m.rope_theta,
    norm_eps=m.norm_eps, lr=o.learning_rate, b1=o.b1, b2=o.b2, eps=o.eps,
    weight_decay=o.weight_decay, warmup_steps=3,
  )  # fmt: skip


# The driver.


class Worker:
  """A persistent worker subprocess spoken to in JSON lines; its stderr kept for error lines."""

  def __init__(self, system: str, argv: list[str], env: dict):
    self.system, self.err = system, tempfile.TemporaryFile('w+')
    t0 = time.perf_counter()
    self.proc = subprocess.Popen(argv, cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                 stderr=self.err, text=True, bufsize=1, env=env)  # fmt: skip
    self.info = self._read()
    self.info['startup_s'] = time.perf_counter() - t0  # process start to warmed up

  def _read(self) -> dict:
    line = self.proc.stdout.readline()
    if not line:
      rc = self.proc.wait()
      self.err.seek(0)
      last = ([ln for ln in self.err.read().splitlines() if ln.strip()] or ['(no stderr)'])[-1]
      raise PeerError(f'{self.system} worker failed (exit {rc}): {last.strip()}')
    return json.loads(line)

  def request(self, n: int) -> dict:
    """The worker's whole reply to {"steps": n}."""
    self.proc.stdin.write(json.dumps({'steps': n}) + '\n')
    return self._read()

  def steps(self, n: int) -> list[float]:
    return self.request(n)['times']

  def close(self) -> None:
    if self.proc.poll() is None:
      try:
        self.proc.stdin.write('{"quit": true}\n')
        self.proc.stdin.close()
        self.proc.wait(timeout=30)
      except (OSError, subprocess.TimeoutExpired):
        self.proc.kill()
    self.err.close()


def worker_env(malloc: str) -> dict:
  """Every worker's environment. 'same': glibc puts large blocks on transparent huge pages in every
  worker from its start, as our commands do on a CPU-only jax (configs/cli.py), torch's worker
  included; 'default': glibc's defaults everywhere."""
  env = dict(os.environ)
  env.pop('GLIBC_TUNABLES', None)
  if malloc == 'same':
    return dict(env, GLIBC_TUNABLES=cli.HUGE_PAGES_TUNABLE)
  if malloc == 'default':
    return dict(env, **{cli.HOST_MEMORY_ENV: 'system'})
  raise PeerError(f'--malloc={malloc!r}: expected same or default')


def run(shape: str, moe: bool, rounds: int, steps: int, torch_python: str, nanodo_src: str | None,
        malloc: str = 'same'):  # fmt: skip
  """The whole comparison as one dict (see the module docstring)."""
  cfg = resolve_shape(shape, moe)
  versions = {'python': platform.python_version(), 'jax': jax.__version__,
              'jaxlib': jaxlib.__version__, 'flax': flax.__version__}  # fmt: skip
  versions.update(check_torch_python(torch_python))
  notes = []
  if nanodo_src and moe:
    notes.append('nanodo skipped: it has no MoE')
    nanodo_src = None
  if nanodo_src:
    versions['nanodo_commit'] = check_nanodo(nanodo_src) or 'unknown (not a git work tree)'
  spec = spec_of(cfg)
  me = [sys.executable, '-m', 'benchmarks.peer_jax']
  argvs = {'project': me + ['project', json.dumps({'shape': shape, 'moe': moe})]}
  if nanodo_src:
    argvs['nanodo'] = me + ['nanodo', json.dumps({'spec': spec, 'nanodo_src': nanodo_src})]
  argvs['torch'] = [torch_python, TORCH_WORKER, json.dumps(spec)]
  env = worker_env(malloc)
  workers, times = {}, {name: [] for name in argvs}
  load_before = os.getloadavg()
  try:
    for name, argv in argvs.items():  # one at a time: each warms up on an otherwise idle host
      print(f'warming up {name} ...', file=sys.stderr, flush=True)
      workers[name] = Worker(name, argv, env)
    names = list(workers)
    for r in range(rounds):  # the order rotates from round to round
      for name in names[r % len(names) :] + names[: r % len(names)]:
        times[name] += workers[name].steps(steps)
  finally:
    for w in workers.values():
      w.close()
  tokens = cfg.train.batch_size * cfg.train.seq_len
  flops = plan.build(cfg.model, cfg.train.seq_len).flops_per_token * tokens
  systems = {}
  for name, w in workers.items():
    med = statistics.median(times[name])
    systems[name] = {**w.info, 'median_s': med, 'min_s': min(times[name]), 'times_s': times[name],
                     'gflops_per_s_plan': flops / med / 1e9}  # fmt: skip
    systems[name].pop('ready', None)
  med = {name: s['median_s'] for name, s in systems.items()}
  ratios = {f'project/{n}': med['project'] / med[n] for n in ('nanodo', 'torch') if n in med}
  if load_before[0] > 0.5 * os.cpu_count():  # load from outside: the times are not clean
    notes.append(f'load average {load_before[0]:.1f} before the run: the host may have been busy')
  if systems['torch'].get('mode') == 'eager':
    notes.append(f'torch ran EAGER: torch.compile failed ({systems["torch"]["compile_error"]})')
  return {
    'shape': shape, 'moe': moe, 'model': dict(spec, head_dim=spec['d'] // spec['heads']),
    'attention_impl': getattr(cfg.attention, 'impl', None), 'cpu': _cpu_model(),
    'cpu_count': os.cpu_count(), 'versions': versions,
    'loadavg_1_5_15': {'before': load_before, 'after': os.getloadavg()},
    'rounds': rounds, 'steps_per_round': steps, 'malloc': malloc, 'plan_flops_per_step': flops,
    'systems': systems, 'ratios_of_medians': ratios, 'notes': notes,
    'method': ('persistent worker per system, each warmed up alone (first_step_s: build + '
               'compile + first step; then 3 untimed steps); then per round each worker in turn '
               '(order rotating) runs steps_per_round steps, each awaited, while the others idle '
               'on stdin. Ratios: our median / theirs (> 1: ours slower)'),
  }  # fmt: skip


def _cpu_model() -> str:
  try:
    with open('/proc/cpuinfo') as f:
      return next(ln.split(':', 1)[1].strip() for ln in f if ln.startswith('model name'))
  except (OSError, StopIteration):
    return platform.processor() or platform.machine()


def _print(result: dict) -> None:
  """One row per system (nanodo '–' when skipped): the table of the issue."""
  rows, ours = [], result['systems']['project']['median_s']
  for name in ('project', 'nanodo', 'torch'):
    s = result['systems'].get(name)
    row = {'system': name + (f' ({s["mode"]})' if s and 'mode' in s else '')}
    for col, val in (('params', lambda: s['params']), ('first_step_s', lambda: s['first_step_s']),
                     ('median_ms', lambda: s['median_s'] * 1e3), ('min_ms', lambda: s['min_s'] * 1e3),
                     ('GFLOP/s', lambda: s['gflops_per_s_plan']),
                     ('ours/this', lambda: f'{ours / s["median_s"]:.2f}x')):  # fmt: skip
      row[col] = (round(val(), 1) if isinstance(val(), float) else val()) if s else '–'
    rows.append(row)
  common.print_table(rows)
  for note in result['notes']:
    print(f'note: {note}')


def _define_flags() -> None:
  """The command-line flags, defined only when run as a program (importing this module, as the
  tests do, defines none, so several benchmarks can be imported into one process)."""
  global _SHAPE, _MOE, _ROUNDS, _STEPS, _NANODO, _TORCH, _SMOKE, _MALLOC
  _SHAPE = flags.DEFINE_string('shape', 'demo', 'Model shape: demo | large.')
  _MOE = flags.DEFINE_bool('moe', False, '8 experts top-2 of width mlp / 2, dropless.')
  _ROUNDS = flags.DEFINE_integer('rounds', 5, 'Interleaved rounds.')
  _STEPS = flags.DEFINE_integer('steps', 20, 'Timed steps per system per round.')
  _NANODO = flags.DEFINE_string('nanodo_src', None, 'A nanodo checkout (commit 10aefde).')
  _TORCH = flags.DEFINE_string('torch_python', os.path.join(ROOT, '.venv-hf', 'bin', 'python'),
                               'Python of the torch + transformers venv (`make hf-check`).')  # fmt: skip
  _SMOKE = flags.DEFINE_bool('smoke', False, 'Toy size, 1 round of 2 steps; writes nothing.')
  _MALLOC = flags.DEFINE_string(
    'malloc',
    'same',
    'same: every worker with glibc large blocks on huge pages (configs/cli.py); '
    'default: glibc defaults everywhere.',
  )


def main(argv):
  del argv
  smoke = _SMOKE.value
  shape = 'smoke' if smoke else _SHAPE.value
  try:
    if not smoke and shape not in ('demo', 'large'):
      raise PeerError(f'unknown shape {shape!r}; known: demo, large')
    result = run(shape, _MOE.value, 1 if smoke else _ROUNDS.value, 2 if smoke else _STEPS.value,
                 os.path.abspath(_TORCH.value), _NANODO.value, _MALLOC.value)  # fmt: skip
  except PeerError as e:
    print(f'peer_step: {e}', file=sys.stderr)
    sys.exit(1)
  _print(result)
  if not smoke:
    result['command'] = 'python -m benchmarks.peer_step ' + ' '.join(sys.argv[1:])
    name = f'peer_step_{shape}' + ('_moe' if _MOE.value else '')
    print(f'wrote {common.write_result(name, result)}')


if __name__ == '__main__':
  _define_flags()
  app.run(main)
