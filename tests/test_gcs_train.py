"""A run whose workdir is a bucket (gs://, on a local fake-gcs-server): it trains, checkpoints,
resumes exactly after kill -9 (and SIGTERM), never takes a half-written checkpoint, holds its lock
on the bucket, and refuses storage it cannot write before step 1."""

import os
import signal
import subprocess
import time

import jax
import numpy as np
import pytest

from data import storage
from tests.tiny_runs import checkpoint_state, metrics_rows, tiny_train_config, train_command
from train.checkpoint import Checkpointer
from train.lock import LOCK_NAME, WorkdirLocked
from train.train import train_and_evaluate

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_STEPS = 100000  # the killed run's schedule length (it is killed long before)


def _cfg(cache_dir, **train):
  return tiny_train_config(cache_dir, steps=_STEPS, log_every=1, **train)


def _logged_step(workdir: str) -> int:
  try:
    text = storage.read_text(storage.join(workdir, 'metrics.jsonl'))
  except (OSError, ValueError):
    return 0
  return text.count('"loss"')


def _assert_same_run(workdir, reference, cfg, step):
  step_a, state_a = checkpoint_state(reference, cfg, step)
  step_b, state_b = checkpoint_state(workdir, cfg)
  assert step_a == step_b == step
  jax.tree.map(np.testing.assert_array_equal, state_a, state_b)
  losses = {r['step']: r['loss'] for r in metrics_rows(reference) if 'loss' in r}
  resumed = [(r['step'], r['loss']) for r in metrics_rows(workdir) if 'loss' in r]
  assert [s for s, _ in resumed] == list(range(1, step + 1))  # one record per step
  assert all(losses[s] == loss for s, loss in resumed)


@pytest.mark.parametrize(
  'sig', [signal.SIGKILL, pytest.param(signal.SIGTERM, marks=pytest.mark.slow)]
)
def test_a_killed_run_on_a_bucket_resumes_exactly(bucket, cache_dir, tmp_path, sig):
  """train.train on gs:// in a subprocess, checkpointing every 4 steps, killed mid-run (kill -9
  leaves its lock behind, and possibly a step half-uploaded); the rerun takes over the stale lock,
  resumes from the newest complete checkpoint and matches a straight local run bit for bit."""
  workdir = storage.join(bucket, 'run')
  args = train_command(
    workdir,
    cache_dir,
    f'--config.train.steps={_STEPS}',
    '--config.train.log_every=1',
    '--config.checkpoint.every_steps=4',
  )
  proc = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
  deadline = time.time() + 180
  while time.time() < deadline and _logged_step(workdir) < 9 and proc.poll() is None:
    time.sleep(0.2)
  assert proc.poll() is None, proc.communicate()[1].decode()[-2000:]
  proc.send_signal(sig)
  _, err = proc.communicate(timeout=120)
  assert proc.returncode == (-signal.SIGKILL if sig == signal.SIGKILL else 0), err[-2000:]
  assert storage.exists(storage.join(workdir, LOCK_NAME)) == (sig == signal.SIGKILL)
  last = Checkpointer(workdir, _cfg(cache_dir).checkpoint, read_only=True).latest_step()
  assert last is not None and last >= 4  # step 8 may still have been uploading: never listed

  cfg = _cfg(cache_dir, stop_after=2)
  train_and_evaluate(cfg, workdir)  # resumes from `last`, 2 more steps
  reference = str(tmp_path / 'straight')
  train_and_evaluate(_cfg(cache_dir, stop_after=last + 2), reference)
  _assert_same_run(workdir, reference, cfg, last + 2)
  assert not storage.exists(storage.join(workdir, LOCK_NAME))  # given back
  files = storage.listdir(workdir)
  assert {'config.json', 'dataset.json', 'metrics.jsonl', 'parameters.txt', 'tb'} <= set(files)
  assert storage.listdir(storage.join(workdir, 'tb'))  # TensorBoard events in the bucket
  assert not any(name.startswith('.write-probe') for name in files)


def test_a_half_written_checkpoint_on_a_bucket_is_never_taken(bucket, cache_dir):
  """A bucket has no atomic rename: Orbax marks a complete step with commit_success.txt, and a step
  without it (an upload cut off) is not listed, so the run resumes from the one before."""
  workdir = storage.join(bucket, 'run')
  cfg = tiny_train_config(cache_dir, steps=16, stop_after=4, log_every=1)
  train_and_evaluate(cfg, workdir)
  train_and_evaluate(cfg, workdir)  # 4 -> 8
  assert Checkpointer(workdir, cfg.checkpoint, read_only=True).all_steps() == [4, 8]
  storage.remove(storage.join(workdir, 'checkpoints', '8', 'commit_success.txt'))
  assert Checkpointer(workdir, cfg.checkpoint, read_only=True).all_steps() == [4]
  assert train_and_evaluate(cfg, workdir)['step'] == 8  # 4 -> 8 again


def test_the_lock_holds_on_a_bucket(bucket, cache_dir):
  import json  # pylint: disable=g-import-not-at-top
  import socket  # pylint: disable=g-import-not-at-top

  workdir = storage.join(bucket, 'locked')
  holder = {'host': socket.gethostname(), 'pid': os.getpid(), 'started': 'earlier'}
  assert storage.create_exclusive(storage.join(workdir, LOCK_NAME), json.dumps(holder).encode())
  assert not storage.create_exclusive(storage.join(workdir, LOCK_NAME), b'{}')
  with pytest.raises(WorkdirLocked, match=rf'is in use by pid {os.getpid()} on this host'):
    train_and_evaluate(tiny_train_config(cache_dir, steps=16, stop_after=1), workdir)
  assert storage.listdir(workdir) == [LOCK_NAME]  # nothing else written


@pytest.mark.parametrize(
  'url,message',
  [
    ('gs://no-such-bucket/run', r"gs://no-such-bucket/run: bucket 'no-such-bucket' does not exist"),
    ('hdfs://cluster/run', r"hdfs://cluster/run: unknown URL scheme 'hdfs://'"),
    ('s3://bucket/run', r's3://bucket/run: checkpoints cannot be written to s3://'),
  ],
)
def test_storage_that_cannot_hold_the_run_is_refused_before_step_1(
  gcs_server, cache_dir, url, message
):
  with pytest.raises(storage.StorageError, match=message):
    train_and_evaluate(tiny_train_config(cache_dir, steps=16, stop_after=1), url)


def test_an_unreachable_endpoint_is_refused_in_one_line_within_seconds(monkeypatch, cache_dir):
  monkeypatch.setenv('STORAGE_EMULATOR_HOST', 'http://127.0.0.1:1')
  t0 = time.monotonic()
  with pytest.raises(storage.StorageError, match=r'gs://runs/x: cannot reach http://127.0.0.1:1'):
    train_and_evaluate(tiny_train_config(cache_dir, steps=16, stop_after=1), 'gs://runs/x')
  assert time.monotonic() - t0 < 20


def test_the_command_prints_one_line_for_a_bad_url(cache_dir):
  proc = subprocess.run(
    train_command('ftp://host/run', cache_dir),
    cwd=ROOT,
    capture_output=True,
    text=True,
    timeout=120,
  )
  assert proc.returncode != 0
  assert "ftp://host/run: unknown URL scheme 'ftp://'" in proc.stderr
  assert 'Traceback' not in proc.stderr


def test_a_resumed_run_on_a_bucket_drops_the_records_after_its_checkpoint(bucket):
  from train.metrics import MetricsLogger  # pylint: disable=g-import-not-at-top

  rows = ''.join(f'{{"step": {s}, "loss": 1.0}}\n' for s in range(1, 8)) + '{"step": 8, "lo'
  storage.write_text(storage.join(bucket, 'w', 'metrics.jsonl'), rows)
  logger = MetricsLogger(
    storage.join(bucket, 'w'),
    total_steps=10,
    tokens_per_step=1,
    flops_per_token=0,
    peak_flops=0,
    resume_step=5,
  )
  logger.record(6, {'step': 6, 'loss': 0.5})
  logger.close()
  assert [r['step'] for r in metrics_rows(storage.join(bucket, 'w'))] == [1, 2, 3, 4, 5, 6]
