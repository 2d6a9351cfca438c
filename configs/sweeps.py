"""Sweep builders and named sweeps for `python -m train.sweep --sweep=NAME`.

A sweep is a list of override dicts keyed by config field ('moe.erc_alpha'). A config file can
define its own as `sweep_NAME()`; the ones here work with any experiment.
"""

import itertools
import math
import random


def grid(**axes) -> list[dict]:
  """Every combination of the listed values: grid(**{'moe.erc_alpha': [0.5, 1.0], ...})."""
  keys = list(axes)
  return [dict(zip(keys, values)) for values in itertools.product(*(axes[k] for k in keys))]


def random_search(space: dict, runs: int, seed: int = 0) -> list[dict]:
  """`runs` draws from `space`: a list is a choice, (low, high) uniform, (low, high, 'log')
  log-uniform; the same seed gives the same runs."""
  rng, out = random.Random(seed), []
  for _ in range(runs):
    draw = {}
    for key, values in space.items():
      if isinstance(values, list):
        draw[key] = rng.choice(values)
      elif isinstance(values, tuple) and len(values) == 3 and values[2] == 'log':
        draw[key] = float(10 ** rng.uniform(math.log10(values[0]), math.log10(values[1])))
      elif isinstance(values, tuple) and len(values) == 2:
        draw[key] = rng.uniform(*values)
      else:
        raise ValueError(f'sweep space {key!r}: expected a list, (low, high) or (low, high, "log")')
    out.append(draw)
  return out


SWEEPS = {
  # Learning rate, log-uniform over a decade and a half, 6 runs.
  'lr': lambda: random_search({'optimizer.learning_rate': (3e-4, 1e-2, 'log')}, runs=6, seed=0),
  # Three seeds of the experiment as it is.
  'seeds': lambda: grid(**{'train.seed': [0, 1, 2]}),
}
