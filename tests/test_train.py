"""Training end to end: loss falls, exact resume, evaluation in a fresh process, in-training
evaluation, old workdirs. Faults (non-finite updates, damaged checkpoints, full disks, signals,
a second trainer) are in test_faults.py."""

import dataclasses
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from configs import schema
from eval.evaluate import evaluate_checkpoint
from tests.tiny_runs import checkpoint_state, metrics_rows, tiny_train_config
from train.checkpoint import Checkpointer
from train.train import train_and_evaluate

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_loss_falls_and_files_are_written(uninterrupted):
  workdir, _ = uninterrupted
  records = metrics_rows(workdir)
  assert [r['step'] for r in records] == list(range(1, 17))
  for key in ('loss', 'learning_rate', 'tokens_per_sec', 'grad_norm'):
    assert key in records[0]
  assert records[-1]['loss'] < records[0]['loss'] - 1.0
  assert os.path.exists(workdir / 'config.json')
  assert any(name.startswith('events') for name in os.listdir(workdir / 'tb'))


def test_stop_and_resume_is_bit_exact(tmp_path, uninterrupted, cache_dir):
  straight_dir, cfg = uninterrupted
  workdir = tmp_path / 'resumed'
  first = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, stop_after=7))
  train_and_evaluate(first, str(workdir))
  assert Checkpointer(str(workdir), cfg.checkpoint, read_only=True).latest_step() == 7
  train_and_evaluate(cfg, str(workdir))  # resumes at 7, runs to 16
  step_a, state_a = checkpoint_state(straight_dir, cfg)
  step_b, state_b = checkpoint_state(workdir, cfg)
  assert step_a == step_b == 16
  jax.tree.map(np.testing.assert_array_equal, state_a, state_b)
  losses_a = {r['step']: r['loss'] for r in metrics_rows(straight_dir)}
  losses_b = {r['step']: r['loss'] for r in metrics_rows(workdir)}
  assert losses_a == losses_b  # same data order, same numbers, step by step


def test_evaluate_in_fresh_process(uninterrupted):
  workdir, _ = uninterrupted
  proc = subprocess.run(
    [sys.executable, '-m', 'eval.evaluate', f'--workdir={workdir}'],
    cwd=ROOT,
    capture_output=True,
    text=True,
    timeout=300,
    env=dict(os.environ, JAX_PLATFORMS='cpu', XLA_FLAGS=''),
  )
  assert proc.returncode == 0, proc.stderr[-2000:]
  result = json.loads(proc.stdout.strip().splitlines()[-1])
  for key in ('step', 'loss', 'perplexity', 'tokens', 'bits_per_byte'):
    assert key in result
  assert result['step'] == 16
  assert result['causal'] is True and result['evaluation'].startswith('teacher_forced')
  assert np.isclose(result['perplexity'], np.exp(result['loss']))
  with open(workdir / 'eval' / 'step_16.json') as f:
    assert json.load(f) == result
  in_process = evaluate_checkpoint(str(workdir))  # 8 devices here: the mesh differs, the loss not
  assert np.isclose(in_process['loss'], result['loss'], rtol=1e-5)


def test_workdir_from_before_a_new_field_still_resumes(tmp_path, cache_dir):
  """A config.json lacking a field added later compares as that field's default."""
  from train.train import write_config

  cfg = tiny_train_config(cache_dir)
  write_config(cfg, str(tmp_path))
  with open(tmp_path / 'config.json') as f:
    old = json.load(f)
  del old['data']['packing']
  with open(tmp_path / 'config.json', 'w') as f:
    json.dump(old, f)
  write_config(cfg, str(tmp_path))  # no error
  changed = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, num_layers=3))
  with pytest.raises(schema.ConfigError, match='model.num_layers=3 but'):
    write_config(changed, str(tmp_path))


def test_kernel_choices_are_free_on_resume(tmp_path, cache_dir):
  """The attention kernel and the MoE grouped-matmul kernel and blocks compute the same values:
  a resumed run may change them; the model's shape may not."""
  from train.train import write_config

  cfg = tiny_train_config(cache_dir)
  write_config(cfg, str(tmp_path))
  m = cfg.model
  faster = dataclasses.replace(
    m,
    attention=dataclasses.replace(m.attention, impl='xla'),
    moe=dataclasses.replace(m.moe, gmm_impl='scan', block_size=64),
  )
  write_config(dataclasses.replace(cfg, model=faster), str(tmp_path))  # no error
  wider = dataclasses.replace(m, moe=dataclasses.replace(m.moe, top_k=m.moe.top_k + 1))
  with pytest.raises(schema.ConfigError, match='moe.top_k=.* but'):
    write_config(dataclasses.replace(cfg, model=wider), str(tmp_path))


def test_in_training_evaluation_compiles_once_and_is_labelled_by_its_state(
  tmp_path, cache_dir, monkeypatch
):
  from train import evaluation as eval_lib  # what train.train calls

  steps = []
  real = eval_lib.make_eval_step

  def counting(*args):
    fn = real(*args)
    steps.append(fn)
    return fn

  monkeypatch.setattr(eval_lib, 'make_eval_step', counting)
  cfg = tiny_train_config(cache_dir, steps=6, log_every=3)
  cfg = dataclasses.replace(cfg, eval=dataclasses.replace(cfg.eval, every_steps=2, max_batches=1))
  train_and_evaluate(cfg, str(tmp_path))
  evals = [r for r in metrics_rows(tmp_path) if 'eval_loss' in r]
  assert len(steps) == 1 and steps[0]._cache_size() == 1  # one jit object, compiled once
  # Read one step late, so each evaluation sees the state after the following step.
  assert [r['step'] for r in evals] == [3, 5, 6]
