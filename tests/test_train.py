"""Training end to end: loss falls, exact resume, preemption, non-finite guard, evaluation."""

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from configs import schema, tiny
from eval.evaluate import evaluate_checkpoint
from train.checkpoint import Checkpointer
from train.step import make_step_fns
from train.train import TrainingError, train_and_evaluate

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _cfg(cache_dir, **train):
  c = tiny.get_config()
  c.data.cache_dir = str(cache_dir)
  c.train.update(**train)
  return schema.load(c, jax.device_count())


@pytest.fixture(scope='module')
def cache_dir(tmp_path_factory):
  return tmp_path_factory.mktemp('corpus')


def _metrics(workdir):
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    return [json.loads(line) for line in f]


def _final_params(workdir, cfg, step=None):
  from train import mesh as mesh_lib
  from configs import sharding
  ckpt = Checkpointer(str(workdir), cfg.checkpoint, read_only=True)
  fns = make_step_fns(cfg, mesh_lib.make_mesh(cfg.mesh), sharding.rules(cfg.mesh.rules))
  step = ckpt.latest_step() if step is None else step
  return step, jax.device_get(ckpt.restore(step, fns.abstract_state()))


@pytest.fixture(scope='module')
def uninterrupted(tmp_path_factory, cache_dir):
  workdir = tmp_path_factory.mktemp('straight')
  cfg = _cfg(cache_dir, steps=16, log_every=1)
  train_and_evaluate(cfg, str(workdir))
  return workdir, cfg


def test_loss_falls_and_files_are_written(uninterrupted):
  workdir, _ = uninterrupted
  records = _metrics(workdir)
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
  step_a, state_a = _final_params(straight_dir, cfg)
  step_b, state_b = _final_params(workdir, cfg)
  assert step_a == step_b == 16
  jax.tree.map(np.testing.assert_array_equal, state_a, state_b)
  losses_a = {r['step']: r['loss'] for r in _metrics(straight_dir)}
  losses_b = {r['step']: r['loss'] for r in _metrics(workdir)}
  assert losses_a == losses_b  # same data order, same numbers, step by step


def test_a_damaged_newest_checkpoint_falls_back_to_the_older_one_exactly(tmp_path, uninterrupted):
  """Checkpoints at 4 and 7; step 7 truncated: the rerun moves it aside (kept), resumes from 4
  and ends bit-identical to an uninterrupted run, one metrics record per step."""
  straight_dir, cfg = uninterrupted
  workdir = tmp_path / 'damaged'
  for stop_after in (4, 3):
    train_and_evaluate(dataclasses.replace(
        cfg, train=dataclasses.replace(cfg.train, stop_after=stop_after)), str(workdir))
  assert Checkpointer(str(workdir), cfg.checkpoint, read_only=True).all_steps() == [4, 7]
  files = sorted(p for p in (workdir / 'checkpoints' / '7').rglob('*') if p.is_file() and
                 p.stat().st_size > 100)
  for f in files:
    f.write_bytes(f.read_bytes()[:len(f.read_bytes()) // 2])  # truncated: a full disk, a crash
  train_and_evaluate(cfg, str(workdir))
  assert [p.name.split('-')[0] for p in (workdir / 'checkpoints_damaged').iterdir()] == ['7']
  _, state_a = _final_params(straight_dir, cfg)
  step_b, state_b = _final_params(workdir, cfg)
  assert step_b == 16
  jax.tree.map(np.testing.assert_array_equal, state_a, state_b)
  losses = {r['step']: r['loss'] for r in _metrics(straight_dir)}
  resumed = [(r['step'], r['loss']) for r in _metrics(workdir) if 'loss' in r]
  assert [step for step, _ in resumed] == sorted({step for step, _ in resumed})
  assert all(losses[step] == loss for step, loss in resumed)


def test_a_full_disk_stops_with_one_line_and_the_last_checkpoint_intact(tmp_path, cache_dir,
                                                                        monkeypatch):
  """ENOSPC injected into the metrics write at step 5 (checkpoint at 4): the error names the
  file and the last good checkpoint, which restores."""
  import errno  # pylint: disable=g-import-not-at-top
  from train import train as train_lib  # pylint: disable=g-import-not-at-top
  from train.metrics import MetricsLogger  # pylint: disable=g-import-not-at-top
  cfg = _cfg(cache_dir, steps=8, log_every=1)
  cfg = dataclasses.replace(cfg, checkpoint=dataclasses.replace(cfg.checkpoint, every_steps=4))
  path = str(tmp_path / 'metrics.jsonl')
  record = MetricsLogger.record

  def full_disk(self, step, rec):
    if step >= 5:
      raise OSError(errno.ENOSPC, 'No space left on device', path)
    record(self, step, rec)

  monkeypatch.setattr(MetricsLogger, 'record', full_disk)
  with pytest.raises(OSError) as raised:
    train_and_evaluate(cfg, str(tmp_path))
  line = train_lib.describe_os_error(train_lib._os_error_in(raised.value), str(tmp_path))  # pylint: disable=protected-access
  assert '\n' not in line and line.startswith(f'cannot write {path}: No space left on device')
  assert 'last good checkpoint: step 4' in line
  step, state = _final_params(tmp_path, cfg, 4)
  assert all(np.isfinite(x).all() for x in jax.tree.leaves(state))


def test_nonfinite_loss_stops_and_keeps_good_checkpoint(tmp_path, cache_dir):
  workdir = tmp_path / 'nan'
  cfg = _cfg(cache_dir, steps=12, stop_after=4)
  train_and_evaluate(cfg, str(workdir))
  explode = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, stop_after=0),
                                optimizer=dataclasses.replace(cfg.optimizer, learning_rate=1e30),
                                checkpoint=dataclasses.replace(cfg.checkpoint, every_steps=1))
  with pytest.raises(TrainingError, match='non-finite loss, gradient or updated state at step'):
    train_and_evaluate(explode, str(workdir))
  step, state = _final_params(workdir, cfg)
  assert step >= 4
  assert all(np.isfinite(x).all() for x in jax.tree.leaves(state))
  # The bad step's update was skipped: its checkpoint holds exactly the state before it.
  ckpt = Checkpointer(str(workdir), cfg.checkpoint, read_only=True)
  previous = ckpt.all_steps()[-2]
  _, before = _final_params(workdir, cfg, previous)
  jax.tree.map(np.testing.assert_array_equal, state, before)


@pytest.mark.parametrize('mode', ['stop', pytest.param('skip', marks=pytest.mark.slow)])
def test_overflowing_update_is_never_applied_nor_saved(tmp_path, cache_dir, mode):
  """learning_rate 3.4e38: the loss and gradient of step 1 are finite, the update is not. The
  guard on the new state refuses it; 'skip' goes on until nonfinite_patience steps in a row."""
  cfg = _cfg(cache_dir, steps=6, on_nonfinite=mode, nonfinite_patience=2)
  cfg = dataclasses.replace(
      cfg, optimizer=dataclasses.replace(cfg.optimizer, learning_rate=3.4e38, warmup_steps=0,
                                         decay='constant'),
      checkpoint=dataclasses.replace(cfg.checkpoint, every_steps=1))
  workdir = tmp_path / mode
  match = r'updated state at step 1 .*the update was not applied' if mode == 'stop' else \
      r'updated state at step 2 .*\(2 in a row\) and training stopped; last good checkpoint'
  with pytest.raises(TrainingError, match=match):
    train_and_evaluate(cfg, str(workdir))
  for step in Checkpointer(str(workdir), cfg.checkpoint, read_only=True).all_steps():
    _, state = _final_params(workdir, cfg, step)
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(state)), step


def test_a_resumed_run_keeps_one_metrics_record_per_step(tmp_path):
  """Records written after the checkpoint a run resumes from are dropped (and a torn last line
  of a killed run with them); earlier ones and other files stay."""
  from train.metrics import MetricsLogger  # pylint: disable=g-import-not-at-top
  path = tmp_path / 'metrics.jsonl'
  path.write_text(''.join(json.dumps({'step': s, 'loss': 1.0}) + '\n' for s in range(1, 8)) +
                  '{"step": 8, "lo')
  MetricsLogger(str(tmp_path), total_steps=10, tokens_per_step=1, flops_per_token=0,
                peak_flops=0, resume_step=5).close()
  assert [r['step'] for r in _metrics(tmp_path)] == [1, 2, 3, 4, 5]


def test_evaluate_in_fresh_process(uninterrupted):
  workdir, _ = uninterrupted
  proc = subprocess.run([sys.executable, '-m', 'eval.evaluate', f'--workdir={workdir}'],
                        cwd=ROOT, capture_output=True, text=True, timeout=300,
                        env=dict(os.environ, JAX_PLATFORMS='cpu', XLA_FLAGS=''))
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


@pytest.mark.parametrize('sig,code', [
    (signal.SIGTERM, 0),
    pytest.param(signal.SIGINT, 130, marks=pytest.mark.slow),  # Ctrl-C: same path, exit 130
])
def test_signal_writes_checkpoint_that_resumes(tmp_path, cache_dir, sig, code):
  workdir = tmp_path / 'preempt'
  args = [sys.executable, '-m', 'train.train', '--config=configs/tiny.py', f'--workdir={workdir}',
          f'--config.data.cache_dir={cache_dir}', '--config.train.steps=100000',
          '--config.checkpoint.every_steps=100000', '--config.train.log_every=1']
  env = dict(os.environ, JAX_PLATFORMS='cpu')
  proc = subprocess.Popen(args, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True)
  metrics = workdir / 'metrics.jsonl'
  deadline = time.time() + 180
  while time.time() < deadline and (not metrics.exists() or metrics.stat().st_size == 0):
    time.sleep(0.5)
  assert proc.poll() is None, proc.communicate()[1][-2000:]
  proc.send_signal(sig)
  _, err = proc.communicate(timeout=120)
  assert proc.returncode == code, err[-2000:]
  steps = Checkpointer(str(workdir), schema.CheckpointConfig(), read_only=True).all_steps()
  assert len(steps) == 1 and 0 < steps[0] < 100000
  resume = subprocess.run(args[:-3] + [f'--config.train.steps={steps[0] + 2}'], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
  assert resume.returncode == 0, resume.stderr[-2000:]
  assert 'Resuming from checkpoint step' in resume.stderr
  # Quiet by default: the run's own lines only (no library INFO), the compile announced and timed.
  assert 'compiling the train step' in resume.stderr and 'compiled in' in resume.stderr
  assert 'checkpoint_manager.py' not in resume.stderr + err and len(resume.stderr.splitlines()) < 12
  assert Checkpointer(str(workdir), schema.CheckpointConfig(), read_only=True).latest_step() == steps[0] + 2
  logged = [r['step'] for r in _metrics(workdir) if 'loss' in r]
  assert logged[:steps[0]] == list(range(1, steps[0] + 1)) and logged[-1] == steps[0] + 2
  assert logged == sorted(set(logged))  # each step once across the two processes


def test_workdir_from_before_a_new_field_still_resumes(tmp_path, cache_dir):
  """A config.json lacking a field added later compares as that field's default."""
  from train.train import write_config
  cfg = _cfg(cache_dir)
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


def test_in_training_evaluation_compiles_once_and_is_labelled_by_its_state(tmp_path, cache_dir,
                                                                         monkeypatch):
  from eval import evaluate as eval_lib
  steps = []
  real = eval_lib.make_eval_step

  def counting(*args):
    fn = real(*args)
    steps.append(fn)
    return fn

  monkeypatch.setattr(eval_lib, 'make_eval_step', counting)
  cfg = _cfg(cache_dir, steps=6, log_every=3)
  cfg = dataclasses.replace(cfg, eval=dataclasses.replace(cfg.eval, every_steps=2, max_batches=1))
  train_and_evaluate(cfg, str(tmp_path))
  evals = [r for r in _metrics(tmp_path) if 'eval_loss' in r]
  assert len(steps) == 1 and steps[0]._cache_size() == 1  # one jit object, compiled once
  # Read one step late, so each evaluation sees the state after the following step.
  assert [r['step'] for r in evals] == [3, 5, 6]


def test_a_second_trainer_on_a_workdir_is_refused_and_a_stale_lock_taken_over(tmp_path, cache_dir):
  """The lock names its holder; a live holder (this process here) or one on another host refuses
  the second trainer before anything is written; a dead holder's lock is taken over."""
  import socket  # pylint: disable=g-import-not-at-top
  from train.lock import LOCK_NAME, WorkdirLocked  # pylint: disable=g-import-not-at-top
  cfg = _cfg(cache_dir, steps=3)
  lock = tmp_path / LOCK_NAME
  holder = {'host': socket.gethostname(), 'pid': os.getpid(), 'started': 'earlier'}
  lock.write_text(json.dumps(holder))
  with pytest.raises(WorkdirLocked, match=rf'is in use by pid {os.getpid()} on this host since'):
    train_and_evaluate(cfg, str(tmp_path))
  assert sorted(p.name for p in tmp_path.iterdir()) == [LOCK_NAME]  # nothing else touched
  lock.write_text(json.dumps({**holder, 'host': 'elsewhere'}))
  with pytest.raises(WorkdirLocked, match='on host elsewhere .*remove the lock file'):
    train_and_evaluate(cfg, str(tmp_path))
  dead = subprocess.run([sys.executable, '-c', 'import os; print(os.getpid())'],
                        capture_output=True, text=True, check=True)
  lock.write_text(json.dumps({**holder, 'pid': int(dead.stdout)}))  # kill -9 leaves this behind
  assert train_and_evaluate(cfg, str(tmp_path))['step'] == 3
  assert not lock.exists()  # given back at the end
