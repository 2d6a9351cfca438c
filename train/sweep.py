"""`python -m train.sweep --config=configs/NAME.py[:ARG] --sweep=SWEEP --workdir=ROOT [--print]`.

A sweep is a list of override dicts ({'moe.erc_alpha': 0.5, ...}) returned by the function
`sweep_SWEEP()` of the config file, or by `configs/sweeps.py::SWEEPS['SWEEP']`; build it with
`configs.sweeps.grid(...)` or `configs.sweeps.random_search(...)`. Every run trains in
ROOT/<its overrides> (so an interrupted sweep resumes: finished runs are skipped, a half-finished
one resumes from its checkpoint), is evaluated from its final checkpoint, and ROOT/results.csv
and ROOT/results.md list the runs' overrides with their final training loss, final held-out
metrics and best held-out metrics over training (in-training evaluations, `eval.every_steps`, and
the final checkpoint), and ROOT/<key>.png plots the held-out loss against each swept numeric
value. Held-out numbers are exact-prefix for a model that reads the future (with its standard
error; the `evaluation` column says which, docs/causality.md). ROOT is a local directory or
gs://BUCKET/PATH (everything above is written through `data.storage`). `--print` writes one
`python -m train.train ...` command per run instead, for a cluster scheduler (a SLURM array or a
TPU launcher takes one line each).
"""

import csv
import importlib.util
import io
import json
import os
import re
import shlex
import sys
from typing import NamedTuple

from absl import app, flags, logging

from configs import cli, schema
from data import storage
from model.config import ConfigError

_CONFIG = flags.DEFINE_string('config', None, 'Experiment config file (configs/NAME.py[:ARG]).')
_SWEEP = flags.DEFINE_string(
  'sweep', None, 'Sweep name: sweep_NAME() in the config file or SWEEPS[NAME] in configs/sweeps.py.'
)
_WORKDIR = flags.DEFINE_string(
  'workdir', None, 'Root directory of the sweep (one subdirectory per run).'
)
_PRINT = flags.DEFINE_bool('print', False, 'Print one train command per run instead of running.')


def _load_module(path: str):
  spec = importlib.util.spec_from_file_location('sweep_config', path)
  if spec is None or not os.path.exists(path):  # local: a Python file, imported
    raise ConfigError(f'--config={path}: no such config file')
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


class Sweep(NamedTuple):
  base: object  # the config file's ConfigDict
  runs: list[dict]  # one dict of overrides per run


def load_sweep(config: str, name: str) -> Sweep:
  """The base ConfigDict and the sweep's override dicts, every key checked against the config."""
  path, _, arg = config.partition(':')
  module = _load_module(path)
  base = module.get_config(arg or None)
  fn = getattr(module, f'sweep_{name}', None)
  if fn is None:
    from configs import sweeps  # pylint: disable=g-import-not-at-top

    if name not in sweeps.SWEEPS:
      raise ConfigError(
        f'--sweep={name}: no sweep_{name}() in {path} and no SWEEPS[{name!r}] in '
        f'configs/sweeps.py (known: {sorted(sweeps.SWEEPS)})'
      )
    fn = sweeps.SWEEPS[name]
  runs = list(fn())
  if not runs:
    raise ConfigError(f'--sweep={name}: the sweep has no runs')
  for overrides in runs:
    apply_overrides(base.copy_and_resolve_references(), overrides)
  return Sweep(base, runs)


def apply_overrides(config, overrides: dict):
  """The ConfigDict with `overrides` set; a key that is not a config field is a ConfigError."""
  for key, value in overrides.items():
    node, *path = key.split('.')
    target = config
    for part in [node, *path[:-1]]:
      if part not in target:
        raise ConfigError(f'sweep key {key!r}: {part!r} is not a config field')
      target = target[part]
    if not path or path[-1] not in target:
      raise ConfigError(f'sweep key {key!r}: not a config field')
    target[path[-1]] = value
  return config


def run_name(overrides: dict) -> str:
  """A directory name from the overrides: 'moe.erc_alpha=0.5,optimizer.learning_rate=0.001'."""
  text = ','.join(f'{k}={_fmt(v)}' for k, v in sorted(overrides.items()))
  return re.sub(r'[^A-Za-z0-9_.=,+-]', '_', text) or 'base'


def _fmt(v) -> str:
  return f'{v:.4g}' if isinstance(v, float) else str(v)


def commands(config: str, root: str, runs: list[dict]) -> list[str]:
  """One `python -m train.train` command per run."""
  out = []
  for overrides in runs:
    args = [
      'python',
      '-m',
      'train.train',
      f'--config={config}',
      f'--workdir={storage.join(root, run_name(overrides))}',
    ]
    args += [
      f'--config.{k}={json.dumps(v) if isinstance(v, (list, tuple)) else v}'
      for k, v in overrides.items()
    ]
    out.append(shlex.join(args))
  return out


def finished(workdir: str, steps: int) -> bool:
  from train.checkpoint import Checkpointer  # pylint: disable=g-import-not-at-top

  if not storage.isdir(storage.join(workdir, 'checkpoints')):
    return False
  return Checkpointer(workdir, schema.CheckpointConfig(), read_only=True).latest_step() == steps


def run_sweep(config: str, name: str, root: str) -> list[dict]:
  """Trains (or resumes, or skips) every run, evaluates it, writes the results tables."""
  import jax  # pylint: disable=g-import-not-at-top

  from train import evaluation, metrics  # pylint: disable=g-import-not-at-top
  from train.train import train_and_evaluate  # pylint: disable=g-import-not-at-top

  base, runs = load_sweep(config, name)
  rows = []
  for overrides in runs:
    cfg = schema.load(
      apply_overrides(base.copy_and_resolve_references(), overrides), jax.device_count()
    )
    workdir = storage.join(root, run_name(overrides))
    if finished(workdir, cfg.train.steps):
      logging.info('sweep: %s finished already; skipped', workdir)
    else:
      train_and_evaluate(cfg, workdir)
    result = evaluation.evaluate_checkpoint(workdir)
    last = metrics.read_metrics(workdir)[-1]
    rows.append(
      {
        'run': run_name(overrides),
        **overrides,
        'train_loss': last['loss'],
        'heldout_loss': result['loss'],
        'heldout_loss_stderr': result.get('loss_stderr', ''),
        'bits_per_byte': result.get('bits_per_byte', ''),
        **best_heldout(metrics.read_eval_metrics(workdir), result),
        'evaluation': result['evaluation'],
      }
    )
  write_results(root, rows)
  plot_results(root, rows, sorted({k for r in runs for k in r}))
  return rows


def best_heldout(heldout: list[dict], final: dict) -> dict:
  """The lowest held-out loss of the run: over its in-training evaluations (`heldout`, the
  `eval_*` records of metrics.jsonl, `eval.every_steps`) and the final checkpoint's `final`
  result, with its step and bits/byte."""
  points = [(final['loss'], final['step'], final.get('bits_per_byte', ''))]
  points += [(r['eval_loss'], r['step'], r.get('eval_bits_per_byte', '')) for r in heldout]
  loss, step, bpb = min(points, key=lambda p: p[0])
  return {'best_heldout_loss': loss, 'best_step': step, 'best_bits_per_byte': bpb}


def write_results(root: str, rows: list[dict]) -> None:
  """ROOT/results.csv and ROOT/results.md, one row per run."""
  keys = list(dict.fromkeys(k for r in rows for k in r))
  table = io.StringIO(newline='')
  writer = csv.DictWriter(table, fieldnames=keys)
  writer.writeheader()
  writer.writerows(rows)
  storage.write_text(storage.join(root, 'results.csv'), table.getvalue())
  lines = ['| ' + ' | '.join(keys) + ' |', '|' + '---|' * len(keys)]
  lines += ['| ' + ' | '.join(_fmt(r.get(k, '')) for k in keys) + ' |' for r in rows]
  storage.write_text(storage.join(root, 'results.md'), '\n'.join(lines) + '\n')


def plot_results(
  root: str, rows: list[dict], keys: list[str], metric: str = 'heldout_loss'
) -> list[str]:
  """ROOT/<key>.png: `metric` against each swept numeric value (log axis over a wide range)."""
  import matplotlib  # pylint: disable=g-import-not-at-top

  matplotlib.use('Agg')
  from matplotlib import pyplot as plt  # pylint: disable=g-import-not-at-top

  paths = []
  for key in keys:
    points = sorted(
      (r[key], r[metric])
      for r in rows
      if isinstance(r.get(key), (int, float)) and not isinstance(r.get(key), bool)
    )
    if len(points) < 2:
      continue
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.plot(*zip(*points), 'o')
    low, high = points[0][0], points[-1][0]
    if low > 0 and high / low > 10:
      ax.set_xscale('log')
    ax.set_xlabel(key)
    ax.set_ylabel(metric)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    paths.append(storage.join(root, f'{re.sub(r"[^A-Za-z0-9_.=-]", "_", key)}.png'))
    storage.write_figure(fig, paths[-1], dpi=100)
    plt.close(fig)
  return paths


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  try:
    if _PRINT.value:
      _, runs = load_sweep(_CONFIG.value, _SWEEP.value)
      print('\n'.join(commands(_CONFIG.value, _WORKDIR.value, runs)))
      return
    storage.makedirs(_WORKDIR.value)
    rows = run_sweep(_CONFIG.value, _SWEEP.value, _WORKDIR.value)
    print(f'{len(rows)} runs; results in {storage.join(_WORKDIR.value, "results.md")}')
  except (ConfigError, storage.StorageError) as e:
    print(f'error: {e}', file=sys.stderr)
    sys.exit(1)


def run():
  cli.prepare_process()
  flags.mark_flags_as_required(['config', 'sweep', 'workdir'])
  app.run(main)


if __name__ == '__main__':
  run()
