"""The bare train step with XLA:CPU's Eigen matrix multiplies against its YNNPACK library fusions.

jaxlib 0.10.2's XLA:CPU hands dots to YNNPACK fusions by default. On an x86-64 CPU-only jax every
command turns them off (configs/cli.py: `cpu_dots_flags`, ROUTED_CPU_DOTS=eigen); this script
measures that choice. Four worker processes serve the same step, dense and MoE, each with
ROUTED_CPU_DOTS=eigen and =xla (XLA's default), taking turns for --rounds rounds of --steps steps.
It reports each worker's step time (median, min), MoE over dense within each setting, and whether
the setting was in effect (a probe dot compiled in the worker is or is not a library fusion).

Usage: python -m benchmarks.cpu_dots [--shape=demo|large] [--rounds=5] [--steps=10] [--smoke]
Hardware: any CPU; the comparison means something on x86-64, where the default applies. About three
minutes on 2 CPU cores at the demo shape. Writes benchmarks/results/cpu_dots_<shape>.json
(--smoke: toy size, writes nowhere).
"""

import os
import sys

from absl import app, flags

from benchmarks import common, host_memory, peer_step
from benchmarks import step_roofline as sr
from configs import cli

SETTINGS = ('eigen', 'xla')


def _environment(setting: str) -> dict:
  """This process's environment with ROUTED_CPU_DOTS=setting and XLA_FLAGS without the dots flag
  (this process set it when it started)."""
  xla_flags = ' '.join(
    f for f in os.environ.get('XLA_FLAGS', '').split() if 'ynn_fusion_type' not in f
  )
  return dict(os.environ, XLA_FLAGS=xla_flags, **{cli.CPU_DOTS_ENV: setting})


def run(shape: str, rounds: int, steps: int) -> dict:
  """The four workers, taking turns; the result as one dict."""
  workers = {
    f'{kind}_{setting}': (kind == 'moe', _environment(setting))
    for kind in ('dense', 'moe')
    for setting in SETTINGS
  }
  info, replies = host_memory.take_turns(workers, shape, rounds, steps)
  per_worker = {
    name: dict(library_dots=info[name]['library_dots'], xla_flags=info[name]['xla_flags'],
               **host_memory.summary(rs))
    for name, rs in replies.items()
  }  # fmt: skip
  med = {name: w['median_s'] for name, w in per_worker.items()}
  return {
    'shape': shape, 'rounds': rounds, 'steps_per_round': steps, 'workers': per_worker,
    'eigen_over_xla': {k: med[f'{k}_eigen'] / med[f'{k}_xla'] for k in ('dense', 'moe')},
    'moe_over_dense': {s: med[f'moe_{s}'] / med[f'dense_{s}'] for s in SETTINGS},
    'settings_in_effect': not per_worker['dense_eigen']['library_dots']
    and per_worker['dense_xla']['library_dots'],
    'method': ('four worker processes (dense and MoE, ROUTED_CPU_DOTS=eigen and =xla) run the bare '
               'jitted train step on one fixed random batch, taking turns (order rotating per '
               'round); MoE: 8 experts of width mlp / 2, top-2, dropless'),
  }  # fmt: skip


def _define_flags() -> None:
  global _SHAPE, _ROUNDS, _STEPS, _SMOKE
  _SHAPE = flags.DEFINE_string('shape', 'demo', 'Model shape: demo | large.')
  _ROUNDS = flags.DEFINE_integer('rounds', 5, 'Rounds; each worker runs --steps steps per round.')
  _STEPS = flags.DEFINE_integer('steps', 10, 'Timed steps per worker per round.')
  _SMOKE = flags.DEFINE_bool('smoke', False, 'Toy size, 1 round of 2 steps; writes nothing.')


def main(argv):
  del argv
  shape = 'smoke' if _SMOKE.value else _SHAPE.value
  try:
    if shape not in sr.SHAPES:
      raise ValueError(f'unknown shape {shape!r}; known: demo, large')
    result = run(shape, 1 if _SMOKE.value else _ROUNDS.value, 2 if _SMOKE.value else _STEPS.value)
  except (ValueError, peer_step.PeerError) as e:
    print(f'cpu_dots: {e}', file=sys.stderr)
    sys.exit(1)
  rows = [{'worker': name, 'library_dots': w['library_dots'],
           'median_ms': round(w['median_s'] * 1e3, 1), 'min_ms': round(w['min_s'] * 1e3, 1),
           'max_rss_MB': round(w['max_rss_mb']), 'final_loss': w['final_loss']}
          for name, w in result['workers'].items()]  # fmt: skip
  print(
    f'bare train step, shape {shape}, on {common.device_description()}: '
    f'{result["rounds"]} rounds of {result["steps_per_round"]} steps per worker, taking turns'
  )
  common.print_table(rows)
  ratios = result['eigen_over_xla']
  print(f'eigen / xla: dense {ratios["dense"]:.2f}x, MoE {ratios["moe"]:.2f}x; MoE / dense: '
        + ', '.join(f'{s} {v:.2f}' for s, v in result['moe_over_dense'].items()))  # fmt: skip
  if not result['settings_in_effect']:
    print('note: the two settings compiled the same dots here (not x86-64, or XLA_FLAGS fixed it)')
  if not _SMOKE.value:
    result['command'] = 'python -m benchmarks.cpu_dots ' + ' '.join(sys.argv[1:])
    print(f'wrote {common.write_result(f"cpu_dots_{shape}", result)}')


if __name__ == '__main__':
  _define_flags()
  app.run(main)
