"""Claim: exact-prefix evaluation of the routed demo costs at most about twice its teacher-forced
evaluation.

`configs/demo.py` (routing attention: not causal) with random weights on the default corpus's
held-out split, its own eval settings (20 batches of 16 x 256, `eval.positions_per_window` = 2):
`eval.evaluate.evaluate_model` (one teacher-forced pass per batch plus one exact-prefix pass per
sampled position) against the teacher-forced pass alone over the same batches, alternating,
after one warm-up call each (compilation excluded). Reports the median wall times and their ratio.

Usage: python -m benchmarks.eval_cost [--rounds=3] [--positions_per_window=2]
"""

import statistics

import jax
import numpy as np
from absl import app, flags
from flax import nnx

from benchmarks import common
from configs import demo, schema, sharding
from data import corpus, pipeline
from eval import causality, evaluate
from train import mesh as mesh_lib
from train.step import make_step_fns

_ROUNDS = flags.DEFINE_integer('rounds', 3, 'Alternating timed calls of each.')
_PER_WINDOW = flags.DEFINE_integer(
  'positions_per_window', None, "Exact-prefix positions per window; default: the demo's."
)


def main(argv):
  del argv
  cfg = schema.load(demo.get_config(), jax.device_count())
  fns = make_step_fns(cfg, mesh_lib.make_mesh(cfg.mesh), sharding.rules(cfg.mesh.rules))
  state = {'model': nnx.state(causality.random_model(cfg.model, scale=0.05))}
  dataset = corpus.resolve_dataset(cfg.data)
  tokens = corpus.load_split(dataset, 'heldout')
  tokenizer = corpus.dataset_tokenizer(dataset)
  step = evaluate.make_eval_step(fns, tokenizer)
  batches = [
    pipeline.make_global_batch(
      {**b, 'cuts': np.zeros((b['inputs'].shape[0], 1), np.int32)}, fns.batch_sharding
    )
    for b in pipeline.eval_batches(
      tokens,
      seq_len=cfg.train.seq_len,
      batch_size=cfg.eval.batch_size,
      max_batches=cfg.eval.max_batches,
    )
  ]

  def teacher_forced():
    return sum(float(step(state['model'], b)['ce']) for b in batches)

  def exact_prefix():
    return evaluate.evaluate_model(fns, state, tokens, cfg, tokenizer, step, _PER_WINDOW.value)

  runs = {'teacher_forced': teacher_forced, 'exact_prefix': exact_prefix}
  times = common.time_alternating(runs, _ROUNDS.value)  # the warm-up call compiles
  median = {name: statistics.median(t) for name, t in times.items()}
  ratio = median['exact_prefix'] / median['teacher_forced']
  per_window = _PER_WINDOW.value or cfg.eval.positions_per_window
  common.print_table([{'evaluation': name, 'median_s': median[name]} for name in runs])
  print(
    f'exact-prefix ({per_window} per window, teacher-forced pass included) / teacher-forced '
    f'only: {ratio:.2f}x (target about <= 2x)'
  )
  print(
    'wrote',
    common.write_result(
      'eval_cost',
      {
        'config': 'configs/demo.py (random weights)',
        'batches': len(batches),
        'batch_size': cfg.eval.batch_size,
        'positions_per_window': per_window,
        'median_s': median,
        'times_s': times,
        'ratio': ratio,
        'command': 'python -m benchmarks.eval_cost',
      },
    ),
  )


if __name__ == '__main__':
  app.run(main)
