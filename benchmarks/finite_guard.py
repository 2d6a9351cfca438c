"""Claim: checking that the new parameters and optimizer state are finite costs a small fraction of
a train step.

The train step refuses a step whose loss, gradient or updated state is not finite
(`train.step.all_finite`, one fused reduction over every floating-point leaf of the state). Its
cost inside the step is at most the cost of the same reduction run on its own: here, the jitted
`all_finite(state)` on the state of `--config`, against the bare jitted train step of that config
(`benchmarks.common.bare_train_step`), alternating, medians of `--rounds` calls.

Usage: python -m benchmarks.finite_guard [--config=demo] [--rounds=20]
"""

import statistics

import jax
from absl import app, flags

from benchmarks import common
from configs import demo, schema, sharding
from train import mesh as mesh_lib
from train.step import all_finite, make_step_fns

_ROUNDS = flags.DEFINE_integer('rounds', 20, 'Alternating timed calls of each.')
_VARIANT = flags.DEFINE_string(
  'variant', None, "configs/demo.py variant (None: the routed demo; 'dense')."
)


def main(argv):
  del argv
  cfg = schema.load(demo.get_config(_VARIANT.value), jax.device_count())
  fns = make_step_fns(cfg, mesh_lib.make_mesh(cfg.mesh), sharding.rules(cfg.mesh.rules))
  state = fns.init()
  guard = jax.jit(all_finite)
  step = common.bare_train_step(cfg)
  calls = {
    'train_step': lambda: jax.block_until_ready(step()),
    'all_finite': lambda: jax.block_until_ready(guard(state)),
  }
  times = common.time_alternating(calls, _ROUNDS.value, warmup=2)
  median = {name: statistics.median(t) for name, t in times.items()}
  ratio = median['all_finite'] / median['train_step']
  leaves = jax.tree.leaves(state)
  common.print_table([{'call': name, 'median_s': median[name]} for name in calls])
  print(
    f'all_finite over {sum(x.size for x in leaves):,} state values / train step: '
    f'{100 * ratio:.2f}% (an upper bound of its cost inside the step)'
  )
  print(
    'wrote',
    common.write_result(
      'finite_guard',
      {
        'config': f'configs/demo.py{":" + _VARIANT.value if _VARIANT.value else ""}',
        'state_values': int(sum(x.size for x in leaves)),
        'median_s': median,
        'ratio': ratio,
        'command': 'python -m benchmarks.finite_guard',
      },
    ),
  )


if __name__ == '__main__':
  app.run(main)
