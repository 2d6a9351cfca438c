"""Sweeps: expansion (grid, seeded random search), key checks, printed commands, resume."""

import os
import shlex
import subprocess
import sys

import pytest

from configs import sweeps
from model.config import ConfigError
from train import sweep

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_grid_is_every_combination():
  runs = sweeps.grid(**{'moe.erc_alpha': [0.5, 1.0], 'optimizer.learning_rate': [1e-3, 3e-3, 1e-2]})
  assert len(runs) == 6 and len({tuple(sorted(r.items())) for r in runs}) == 6
  assert runs[0] == {'moe.erc_alpha': 0.5, 'optimizer.learning_rate': 1e-3}


def test_random_search_is_seeded_and_stays_in_its_space():
  space = {
    'optimizer.learning_rate': (1e-4, 1e-2, 'log'),
    'train.seed': [0, 1, 2],
    'moe.erc_alpha': (0.5, 1.0),
  }
  a, b = sweeps.random_search(space, 20, seed=3), sweeps.random_search(space, 20, seed=3)
  assert a == b and a != sweeps.random_search(space, 20, seed=4)
  for r in a:
    assert 1e-4 <= r['optimizer.learning_rate'] <= 1e-2 and r['train.seed'] in (0, 1, 2)
    assert 0.5 <= r['moe.erc_alpha'] <= 1.0


def test_sweep_keys_must_be_config_fields(tmp_path):
  path = tmp_path / 'exp.py'
  path.write_text(
    'from configs import tiny\nget_config = tiny.get_config\n'
    'def sweep_bad():\n  return [{"optimizer.learning_rat": 1e-3}]\n'
    'def sweep_empty():\n  return []\n'
  )
  with pytest.raises(ConfigError, match="sweep key 'optimizer.learning_rat': not a config field"):
    sweep.load_sweep(str(path), 'bad')
  with pytest.raises(ConfigError, match='--sweep=empty: the sweep has no runs'):
    sweep.load_sweep(str(path), 'empty')
  with pytest.raises(ConfigError, match='--sweep=nope: no sweep_nope'):
    sweep.load_sweep(str(path), 'nope')


def test_printed_commands_name_their_workdir_and_overrides():
  _, runs = sweep.load_sweep('configs/moe_erc.py:tiny', 'alpha')
  lines = sweep.commands('configs/moe_erc.py:tiny', '/tmp/root', runs)
  assert len(lines) == len(runs) == 6
  args = shlex.split(lines[0])
  assert args[:4] == ['python', '-m', 'train.train', '--config=configs/moe_erc.py:tiny']
  assert args[4] == '--workdir=/tmp/root/moe.erc_alpha=0.5,moe.erc_weight=0.1'
  assert args[5:] == ['--config.moe.erc_alpha=0.5', '--config.moe.erc_weight=0.1']
  assert len({shlex.split(l)[4] for l in lines}) == 6  # one workdir per run


def test_print_flag_prints_one_line_per_run():
  out = subprocess.run(
    [
      sys.executable,
      '-m',
      'train.sweep',
      '--config=configs/tiny.py',
      '--sweep=seeds',
      '--workdir=/tmp/sweep_root',
      '--print',
    ],
    cwd=ROOT,
    capture_output=True,
    text=True,
    timeout=120,
  )
  assert out.returncode == 0, out.stderr[-2000:]
  lines = out.stdout.strip().splitlines()
  assert [shlex.split(l)[-1] for l in lines] == [f'--config.train.seed={i}' for i in range(3)]


@pytest.mark.slow
def test_a_sweep_runs_as_printed_writes_its_table_and_skips_finished_runs(tmp_path):
  path = tmp_path / 'exp.py'
  path.write_text(
    'from configs import tiny\n'
    'def get_config(arg=None):\n'
    '  c = tiny.get_config()\n'
    f'  c.data.cache_dir = {str(tmp_path / "cache")!r}\n'
    '  c.train.update(steps=4, log_every=1)\n'
    '  c.eval.update(every_steps=2, max_batches=2)\n'
    '  c.optimizer.warmup_steps = 1\n'
    '  return c\n'
    'def sweep_lr():\n  return [{"optimizer.learning_rate": 1e-3}, '
    '{"optimizer.learning_rate": 3e-3}]\n'
  )
  root = str(tmp_path / 'root')
  os.makedirs(root)
  # The first printed command, run as printed (with this interpreter as `python`), trains run 0.
  first = shlex.split(sweep.commands(str(path), root, sweep.load_sweep(str(path), 'lr')[1])[0])
  proc = subprocess.run(
    [sys.executable, *first[1:]],
    cwd=ROOT,
    capture_output=True,
    text=True,
    timeout=300,
    env={**os.environ, 'JAX_PLATFORMS': 'cpu'},
  )
  assert proc.returncode == 0, proc.stderr[-2000:]
  printed_log = open(os.path.join(root, 'optimizer.learning_rate=0.001', 'metrics.jsonl')).read()
  rows = sweep.run_sweep(str(path), 'lr', root)  # run 0 finished already: skipped, not retrained
  assert open(os.path.join(root, rows[0]['run'], 'metrics.jsonl')).read() == printed_log
  assert [r['run'] for r in rows] == [
    'optimizer.learning_rate=0.001',
    'optimizer.learning_rate=0.003',
  ]
  for r in rows:
    assert r['best_heldout_loss'] <= r['heldout_loss'] and r['best_step'] in (2, 4)
  table = open(os.path.join(root, 'results.md')).read()
  assert table.count('\n') == 4 and 'best_heldout_loss' in table
  with open(os.path.join(root, 'optimizer.learning_rate.png'), 'rb') as f:
    assert f.read(8) == b'\x89PNG\r\n\x1a\n'
  logs = [open(os.path.join(root, r['run'], 'metrics.jsonl')).read() for r in rows]
  again = sweep.run_sweep(str(path), 'lr', root)  # finished runs are skipped, not retrained
  assert [open(os.path.join(root, r['run'], 'metrics.jsonl')).read() for r in rows] == logs
  assert [r['heldout_loss'] for r in again] == [r['heldout_loss'] for r in rows]
