"""Claim: sampling the routed demo model (non-causal: routing attention) costs at most 5x the dense
demo's sampling, with one compilation per length bucket (not one per token).

Both models sample `--new_tokens` tokens (default 200) after the same prompt with `eval.sample.sample`
(the routed one through the validity mask, the dense one from the plain buffer), alternating
`--rounds` times. Reported per model: the median wall time of a whole call (including its first,
compiling call separately), the compilations it caused, and the ratio routed / dense of the
medians. Timing does not depend on the weights, so by default both are random models of
configs/demo.py and configs/demo.py:dense; `--workdir` / `--dense_workdir` sample checkpoints.

Usage: python -m benchmarks.sampling [--new_tokens=200] [--rounds=3]
       [--workdir=runs/demo --dense_workdir=runs/demo_dense]
"""

import statistics
import time

import jax
from absl import app, flags

from benchmarks import common
from configs import demo, schema
from eval import causality, evaluate, sample

_NEW = flags.DEFINE_integer('new_tokens', 200, 'Tokens to sample per call.')
_ROUNDS = flags.DEFINE_integer('rounds', 3, 'Timed calls per model (alternating), after the first.')
_WORKDIR = flags.DEFINE_string(
  'workdir', None, 'Routed run to sample (default: random demo model).'
)
_DENSE = flags.DEFINE_string('dense_workdir', None, 'Dense run (default: random demo:dense model).')
PROMPT = 'def main(argv):\n    '


def _model(workdir, arg):
  if workdir:
    return evaluate.restore_model(workdir).model, workdir
  cfg = schema.load(demo.get_config(arg), jax.device_count())
  return causality.random_model(
    cfg.model, scale=0.05
  ), f'random configs/demo.py{":" + arg if arg else ""}'


def _compilations() -> int:
  return sample._next_token._cache_size()  # pylint: disable=protected-access


def main(argv):
  del argv
  prompt = [int(c) for c in PROMPT.encode()]
  models = {'routed': _model(_WORKDIR.value, None), 'dense': _model(_DENSE.value, 'dense')}
  run = lambda model: sample.sample(
    model, prompt, max_new_tokens=_NEW.value, vocab_size=257, temperature=1.0, seed=0
  )
  first, compiles, times = {}, {}, {name: [] for name in models}
  for name, (model, _) in models.items():
    before = _compilations()
    t0 = time.perf_counter()
    run(model)
    first[name] = time.perf_counter() - t0
    compiles[name] = _compilations() - before
  for _ in range(_ROUNDS.value):
    for name, (model, _) in models.items():
      t0 = time.perf_counter()
      run(model)
      times[name].append(time.perf_counter() - t0)
  rows = [
    {
      'model': name,
      'source': models[name][1],
      'causal': models[name][0].causal,
      'first_call_s': first[name],
      'compilations': compiles[name],
      'median_s': statistics.median(times[name]),
      'ms_per_token': 1e3 * statistics.median(times[name]) / _NEW.value,
    }
    for name in models
  ]
  ratio = rows[0]['median_s'] / rows[1]['median_s']
  common.print_table(rows)
  print(
    f'routed / dense, median of {_ROUNDS.value} alternating calls: {ratio:.2f}x '
    f'(target <= 5x); first calls (with compilation): '
    f'{first["routed"] / first["dense"]:.2f}x'
  )
  path = common.write_result(
    'sampling',
    {
      'new_tokens': _NEW.value,
      'rounds': _ROUNDS.value,
      'prompt': PROMPT,
      'rows': rows,
      'ratio_median': ratio,
      'ratio_first_call': first['routed'] / first['dense'],
      'command': 'python -m benchmarks.sampling',
    },
  )
  print(f'wrote {path}')


if __name__ == '__main__':
  app.run(main)
