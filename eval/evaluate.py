"""`python -m eval.evaluate --workdir=DIR [--step=N] [--data=PATH] [--baseline] [--positions_per_window=P]`.

Restores a checkpoint in a fresh process (config from DIR/config.json), evaluates the held-out
split, writes DIR/eval/step_N.json and prints one JSON line last. `--baseline` also evaluates the
same architecture at initialisation, for comparison. DIR may be local or gs://BUCKET/PATH.

Numbers are honest for every model (docs/causality.md): a causal model is scored teacher-forced
(`"causal": true`), a model whose logits at t can read tokens after t is scored exact-prefix, each
sampled position from its prefix alone (`"causal": false`, `loss` with `loss_stderr`, and the
teacher-forced numbers beside it as `teacher_forced_*`).

The evaluation itself lives in train/, where training and sweeps use it too: `train.evaluation`
(eval step, `evaluate_model`, `evaluate_checkpoint`) and `train.restore` (a run's config,
tokenizer and checkpoints; `restore_model`, the one way a model is read back); this module is
its command line and keeps their names importable.
"""

import json
import sys

from absl import app, flags

from configs import cli
from data import corpus
from model.config import ConfigError
from train.evaluation import (
  coupling_levels,
  eval_model,
  eval_step,
  evaluate_checkpoint,
  evaluate_model,
  make_eval_step,
  paired_estimate,
  sampled_positions,
)
from train.restore import (
  RestoredModel,
  check_same_tokenizer,
  checkpoint_step,
  read_run_config,
  restore_model,
  run_tokenizer,
  run_tokenizer_identity,
)

__all__ = [
  'check_same_tokenizer',
  'checkpoint_step',
  'coupling_levels',
  'eval_model',
  'eval_step',
  'evaluate_checkpoint',
  'evaluate_model',
  'make_eval_step',
  'paired_estimate',
  'read_run_config',
  'RestoredModel',
  'restore_model',
  'run_tokenizer',
  'run_tokenizer_identity',
  'sampled_positions',
  'main',
  'run',
]


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  f = flags.FLAGS
  try:
    result = evaluate_checkpoint(f.workdir, f.step, f.data, f.baseline, f.positions_per_window)
  except (ConfigError, corpus.DataError) as e:
    print(f'error: {e}', file=sys.stderr)
    sys.exit(1)
  print(json.dumps(result))


def run():
  # Flags are defined here, not at import, so train/eval modules can be imported together.
  flags.DEFINE_string('workdir', None, 'Run directory written by train.train.')
  flags.DEFINE_integer('step', None, 'Checkpoint step; default: the newest.')
  flags.DEFINE_string('data', None, "Prepared dataset to evaluate; default: the run's own.")
  flags.DEFINE_bool('baseline', False, 'Also evaluate the untrained model (same seed).')
  flags.DEFINE_integer(
    'positions_per_window',
    None,
    'Models that read the future: positions per held-out window scored from '
    "their exact prefix; default: the run's eval.positions_per_window.",
  )
  flags.mark_flags_as_required(['workdir'])
  app.run(main, flags_parser=cli.parse_flags)


if __name__ == '__main__':
  run()
