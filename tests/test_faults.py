"""Faults a run must survive without training on damaged data or losing work: a damaged token store
(deleted, truncated or altered shard file; checked before training and on every read), a
non-finite loss or update (never applied, never saved), a damaged newest checkpoint (fallback,
exact), a full disk, SIGTERM and Ctrl-C, a second trainer on a workdir, an oversized model.

Bad input is tested where its parser lives: invalid config numbers and unknown variants in
test_config.py, prepare's bad records and files in test_data.py and test_data_layer.py, a
tokenizer mismatch in test_tokenizer_per_run.py."""

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
from data import corpus, pipeline, prepare, sources, verify
from data.errors import DataError
from tests.tiny_runs import checkpoint_state, metrics_rows, tiny_train_config, train_command
from train import train as train_lib
from train.checkpoint import Checkpointer
from train.train import TrainingError, train_and_evaluate

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

DOCS = [
  f'document {i}: ' + 'the quick brown fox jumps over the lazy dog. ' * (40 + i) for i in range(30)
]


@pytest.fixture
def prepared(tmp_path):
  """A fresh small prepared dataset (one shard file per split) that a test may damage."""
  (tmp_path / 'in').mkdir()
  for i, doc in enumerate(DOCS):
    (tmp_path / 'in' / f'{i:02d}.txt').write_text(doc)
  out = tmp_path / 'data'
  prepare.prepare_dataset(str(tmp_path / 'in' / '*.txt'), str(out), processes=1)
  return str(out)


def _resolve(path, mode):
  corpus._VERIFIED.clear()  # pylint: disable=protected-access  (a fresh process each time)
  return corpus.resolve_dataset(schema.DataConfig(path=path, verify=mode))


def _shard(prepared):
  return os.path.join(prepared, 'train', 'tokens', 'c', '0')


def _flip_byte(path, at):
  with open(path, 'r+b') as fh:
    fh.seek(at)
    byte = fh.read(1)
    fh.seek(at)
    fh.write(bytes([byte[0] ^ 0x40]))


def test_prepare_records_every_file_and_an_intact_store_passes(prepared):
  meta = corpus.load_metadata(prepared)
  assert meta['format_version'] == 2
  assert set(meta['checksums']) == {
    'train/offsets.npy',
    'train/tokens/zarr.json',
    'train/tokens/c/0',
    'heldout/offsets.npy',
    'heldout/tokens/zarr.json',
    'heldout/tokens/c/0',
  }
  for mode, ran in (('auto', 'full'), ('full', 'full'), ('sizes', 'sizes'), ('off', 'off')):
    assert verify.check(prepared, meta, mode) == ran
  assert _resolve(prepared, 'auto') == prepared


@pytest.mark.parametrize('mode', ['full', 'sizes'])
def test_a_deleted_or_truncated_shard_is_refused_before_training(prepared, mode):
  shard = _shard(prepared)
  size = os.path.getsize(shard)
  with open(shard, 'r+b') as fh:
    fh.truncate(size - 1)
  with pytest.raises(DataError, match=f'{shard} has {size - 1} bytes, {size} were prepared') as e:
    _resolve(prepared, mode)
  assert '\n' not in str(e.value) and 're-run python -m data.prepare' in str(e.value)
  os.remove(shard)
  with pytest.raises(DataError, match=f'{shard} is missing'):
    _resolve(prepared, mode)


def test_an_altered_byte_is_refused_by_full_and_by_every_read(prepared):
  shard = _shard(prepared)
  _flip_byte(shard, 100)  # inside the first inner chunk: same size, other content
  with pytest.raises(DataError, match=f'{shard} does not match its recorded sha256'):
    _resolve(prepared, 'full')
  assert _resolve(prepared, 'sizes') == prepared  # sizes cannot see it; the read's crc32c does
  split = sources.open_split(prepared, 'train')
  with pytest.raises(
    DataError, match=f'cannot read tokens.*{shard}.*re-run python -m data.prepare'
  ):
    split.tokens.read_many([0], [10])
  assert split.tokens[5000:5010].shape == (10,)  # other chunks still read


def test_a_missing_chunk_is_never_read_as_zeros(prepared):
  os.remove(_shard(prepared))
  _resolve(prepared, 'off')  # no file check: the read itself must refuse
  batches = pipeline.train_dataset(
    sources.open_split(prepared, 'train'), schema.DataConfig(), seq_len=16, global_batch_size=2
  )
  with pytest.raises(DataError, match='cannot read tokens.*missing'):
    next(iter(batches))


def test_training_on_a_damaged_store_stops_in_one_line_before_compiling(
  prepared, tmp_path, monkeypatch
):
  _flip_byte(_shard(prepared), 200)
  corpus._VERIFIED.clear()  # pylint: disable=protected-access
  c = tiny.get_config()
  c.data.path = prepared
  cfg = schema.load(c, jax.device_count())
  monkeypatch.setattr(train_lib, 'make_step_fns', lambda *a, **k: pytest.fail('compiled'))
  with pytest.raises(DataError, match='does not match its recorded sha256'):
    train_and_evaluate(cfg, str(tmp_path / 'run'))
  assert not os.path.exists(tmp_path / 'run' / 'checkpoints')


def test_a_dataset_without_checksums_is_still_read(prepared):
  meta = corpus.load_metadata(prepared)
  del meta['checksums']  # as prepared before checksums were recorded
  assert verify.check(prepared, meta, 'full') == 'off'
  tokens = corpus.load_split(prepared, 'train')
  assert tokens.dtype == np.uint16 and len(tokens) > 1000


def test_a_damaged_newest_checkpoint_falls_back_to_the_older_one_exactly(tmp_path, uninterrupted):
  """Checkpoints at 4 and 7; step 7 truncated: the rerun moves it aside (kept), resumes from 4
  and ends bit-identical to an uninterrupted run, one metrics record per step."""
  straight_dir, cfg = uninterrupted
  workdir = tmp_path / 'damaged'
  for stop_after in (4, 3):
    train_and_evaluate(
      dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, stop_after=stop_after)),
      str(workdir),
    )
  assert Checkpointer(str(workdir), cfg.checkpoint, read_only=True).all_steps() == [4, 7]
  files = sorted(
    p for p in (workdir / 'checkpoints' / '7').rglob('*') if p.is_file() and p.stat().st_size > 100
  )
  for f in files:
    f.write_bytes(f.read_bytes()[: len(f.read_bytes()) // 2])  # truncated: a full disk, a crash
  train_and_evaluate(cfg, str(workdir))
  assert [p.name.split('-')[0] for p in (workdir / 'checkpoints_damaged').iterdir()] == ['7']
  _, state_a = checkpoint_state(straight_dir, cfg)
  step_b, state_b = checkpoint_state(workdir, cfg)
  assert step_b == 16
  jax.tree.map(np.testing.assert_array_equal, state_a, state_b)
  losses = {r['step']: r['loss'] for r in metrics_rows(straight_dir)}
  resumed = [(r['step'], r['loss']) for r in metrics_rows(workdir) if 'loss' in r]
  assert [step for step, _ in resumed] == sorted({step for step, _ in resumed})
  assert all(losses[step] == loss for step, loss in resumed)


def test_a_full_disk_stops_with_one_line_and_the_last_checkpoint_intact(
  tmp_path, cache_dir, monkeypatch
):
  """ENOSPC injected into the metrics write at step 5 (checkpoint at 4): the error names the
  file and the last good checkpoint, which restores."""
  import errno  # pylint: disable=g-import-not-at-top

  from train import train as train_lib  # pylint: disable=g-import-not-at-top
  from train.metrics import MetricsLogger  # pylint: disable=g-import-not-at-top

  cfg = tiny_train_config(cache_dir, steps=16, log_every=1)
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
  line = train_lib.describe_os_error(train_lib.os_error_in(raised.value), str(tmp_path))
  assert '\n' not in line and line.startswith(f'cannot write {path}: No space left on device')
  assert 'last good checkpoint: step 4' in line
  step, state = checkpoint_state(tmp_path, cfg, 4)
  assert all(np.isfinite(x).all() for x in jax.tree.leaves(state))


def test_nonfinite_loss_stops_and_keeps_good_checkpoint(tmp_path, cache_dir):
  workdir = tmp_path / 'nan'
  cfg = tiny_train_config(cache_dir, steps=16, stop_after=4)
  train_and_evaluate(cfg, str(workdir))
  explode = dataclasses.replace(
    cfg,
    train=dataclasses.replace(cfg.train, stop_after=0),
    optimizer=dataclasses.replace(cfg.optimizer, learning_rate=1e30),
    checkpoint=dataclasses.replace(cfg.checkpoint, every_steps=1),
  )
  with pytest.raises(TrainingError, match='non-finite loss, gradient or updated state at step'):
    train_and_evaluate(explode, str(workdir))
  step, state = checkpoint_state(workdir, cfg)
  assert step >= 4
  assert all(np.isfinite(x).all() for x in jax.tree.leaves(state))
  # The bad step's update was skipped: its checkpoint holds exactly the state before it.
  ckpt = Checkpointer(str(workdir), cfg.checkpoint, read_only=True)
  previous = ckpt.all_steps()[-2]
  _, before = checkpoint_state(workdir, cfg, previous)
  jax.tree.map(np.testing.assert_array_equal, state, before)


@pytest.mark.parametrize('mode', ['stop', pytest.param('skip', marks=pytest.mark.slow)])
def test_overflowing_update_is_never_applied_nor_saved(tmp_path, cache_dir, mode):
  """learning_rate 3.4e38: the loss and gradient of step 1 are finite, the update is not. The
  guard on the new state refuses it; 'skip' goes on until nonfinite_patience steps in a row."""
  cfg = tiny_train_config(cache_dir, steps=6, on_nonfinite=mode, nonfinite_patience=2)
  cfg = dataclasses.replace(
    cfg,
    optimizer=dataclasses.replace(
      cfg.optimizer, learning_rate=3.4e38, warmup_steps=0, decay='constant'
    ),
    checkpoint=dataclasses.replace(cfg.checkpoint, every_steps=1),
  )
  workdir = tmp_path / mode
  match = (
    r'updated state at step 1 .*the update was not applied'
    if mode == 'stop'
    else r'updated state at step 2 .*\(2 in a row\) and training stopped; last good checkpoint'
  )
  with pytest.raises(TrainingError, match=match):
    train_and_evaluate(cfg, str(workdir))
  for step in Checkpointer(str(workdir), cfg.checkpoint, read_only=True).all_steps():
    _, state = checkpoint_state(workdir, cfg, step)
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(state)), step


def test_a_resumed_run_keeps_one_metrics_record_per_step(tmp_path):
  """Records written after the checkpoint a run resumes from are dropped (and a torn last line
  of a killed run with them); earlier ones and other files stay."""
  from train.metrics import MetricsLogger  # pylint: disable=g-import-not-at-top

  path = tmp_path / 'metrics.jsonl'
  path.write_text(
    ''.join(json.dumps({'step': s, 'loss': 1.0}) + '\n' for s in range(1, 8)) + '{"step": 8, "lo'
  )
  MetricsLogger(
    str(tmp_path), total_steps=10, tokens_per_step=1, flops_per_token=0, peak_flops=0, resume_step=5
  ).close()
  assert [r['step'] for r in metrics_rows(tmp_path)] == [1, 2, 3, 4, 5]


@pytest.mark.parametrize(
  'sig,code',
  [
    # ~18 s each (a training subprocess signalled mid-run, then resumed): in the slow set
    pytest.param(signal.SIGTERM, 0, marks=pytest.mark.slow),
    pytest.param(signal.SIGINT, 130, marks=pytest.mark.slow),  # Ctrl-C: same path, exit 130
  ],
)
def test_signal_writes_checkpoint_that_resumes(tmp_path, cache_dir, sig, code):
  workdir = tmp_path / 'preempt'
  args = train_command(
    workdir,
    cache_dir,
    '--config.train.steps=100000',
    '--config.checkpoint.every_steps=100000',
    '--config.train.log_every=1',
  )
  env = dict(os.environ, JAX_PLATFORMS='cpu')
  proc = subprocess.Popen(
    args, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
  )
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
  # Same flags (so the same compiled step, from the persistent cache) and 2 more steps.
  resume = subprocess.run(
    args + ['--config.train.stop_after=2'],
    cwd=ROOT,
    env=env,
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert resume.returncode == 0, resume.stderr[-2000:]
  assert 'Resuming from checkpoint step' in resume.stderr
  # Quiet by default: the run's own lines only (no library INFO), the compile announced and timed.
  assert 'compiling the train step' in resume.stderr and 'compiled in' in resume.stderr
  assert 'checkpoint_manager.py' not in resume.stderr + err and len(resume.stderr.splitlines()) < 12
  assert (
    Checkpointer(str(workdir), schema.CheckpointConfig(), read_only=True).latest_step()
    == steps[0] + 2
  )
  logged = [r['step'] for r in metrics_rows(workdir) if 'loss' in r]
  assert logged[: steps[0]] == list(range(1, steps[0] + 1)) and logged[-1] == steps[0] + 2
  assert logged == sorted(set(logged))  # each step once across the two processes


def test_a_second_trainer_on_a_workdir_is_refused_and_a_stale_lock_taken_over(tmp_path, cache_dir):
  """The lock names its holder; a live holder (this process here) or one on another host refuses
  the second trainer before anything is written; a dead holder's lock is taken over."""
  import socket  # pylint: disable=g-import-not-at-top

  from train.lock import LOCK_NAME, WorkdirLocked  # pylint: disable=g-import-not-at-top

  cfg = tiny_train_config(cache_dir, steps=16, stop_after=3)  # the compiled step of `uninterrupted`
  lock = tmp_path / LOCK_NAME
  holder = {'host': socket.gethostname(), 'pid': os.getpid(), 'started': 'earlier'}
  lock.write_text(json.dumps(holder))
  with pytest.raises(WorkdirLocked, match=rf'is in use by pid {os.getpid()} on this host since'):
    train_and_evaluate(cfg, str(tmp_path))
  assert sorted(p.name for p in tmp_path.iterdir()) == [LOCK_NAME]  # nothing else touched
  lock.write_text(json.dumps({**holder, 'host': 'elsewhere'}))
  with pytest.raises(WorkdirLocked, match='on host elsewhere .*remove the lock file'):
    train_and_evaluate(cfg, str(tmp_path))
  dead = subprocess.run(
    [sys.executable, '-c', 'import os; print(os.getpid())'],
    capture_output=True,
    text=True,
    check=True,
  )
  lock.write_text(json.dumps({**holder, 'pid': int(dead.stdout)}))  # kill -9 leaves this behind
  assert train_and_evaluate(cfg, str(tmp_path))['step'] == 3
  assert not lock.exists()  # given back at the end


def test_a_model_beyond_the_machines_memory_is_refused_before_anything_is_written(tmp_path):
  c = tiny.get_config()
  c.model.update(d_model=1 << 16, num_layers=16)
  cfg = schema.load(c, jax.device_count())
  with pytest.raises(
    schema.ConfigError,
    match=r'training needs at least .* GiB per device .* '
    r'set --config.train.check_memory=False to try anyway',
  ) as e:
    train_and_evaluate(cfg, str(tmp_path / 'run'))
  assert '\n' not in str(e.value) and not (tmp_path / 'run').exists()
