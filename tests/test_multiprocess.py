"""Multi-process (pod-slice) path on one machine: start-up, mesh, data, checkpoints, failures.

The fast tests check the pieces; the slow ones start real 2-process runs (gloo collectives,
4 CPU devices each) against the 1-process, 8-device run of this test process.
"""

import os
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from configs import schema, tiny
from data import corpus, pipeline
from model.config import ConfigError
from tests.tiny_runs import metrics_rows, train_command
from train import distributed, launch
from train import mesh as mesh_lib
from train.checkpoint import Checkpointer
from train.train import train_and_evaluate

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def clean_env(monkeypatch):
  for name in (
    *distributed.ENV.values(),
    'TPU_WORKER_HOSTNAMES',
    'SLURM_STEP_NUM_TASKS',
    'SLURM_NTASKS',
    'OMPI_COMM_WORLD_SIZE',
  ):
    monkeypatch.delenv(name, raising=False)
  return monkeypatch


def test_parameters_from_flags_environment_and_cluster(clean_env):
  assert distributed.parameters() is None  # a plain single-process run starts nothing
  assert distributed.parameters('h:1', 2, 0) == {
    'coordinator_address': 'h:1',
    'num_processes': 2,
    'process_id': 0,
  }
  assert distributed.parameters('h:1', 1, 0) is None
  clean_env.setenv(distributed.ENV['coordinator_address'], 'h:2')
  clean_env.setenv(distributed.ENV['num_processes'], '4')
  clean_env.setenv(distributed.ENV['process_id'], '3')
  assert distributed.parameters(process_id=1)['process_id'] == 1  # flags win over the environment
  assert distributed.parameters()['num_processes'] == 4
  with pytest.raises(ValueError, match='--process_id=7'):
    distributed.parameters(process_id=7)
  clean_env.delenv(distributed.ENV['process_id'])
  with pytest.raises(ValueError, match=r'--process_id \(or \$ROUTED_PROCESS_ID\) is missing'):
    distributed.parameters()
  for name in distributed.ENV.values():
    clean_env.delenv(name, raising=False)
  clean_env.setenv('SLURM_NTASKS', '16')
  assert distributed.parameters() == {}  # jax.distributed detects the cluster itself


def test_processes_go_on_the_outermost_axis_they_divide():
  cfg = schema.MeshConfig(shape=(1, -1, 1, 1))
  assert mesh_lib.dcn_shape(cfg, (1, 8, 1, 1), 2) == (1, 2, 1, 1)
  assert mesh_lib.dcn_shape(cfg, (4, 2, 1, 1), 2) == (2, 1, 1, 1)
  explicit = schema.MeshConfig(shape=(2, 4, 1, 1), dcn_shape=(1, 2, 1, 1))
  assert mesh_lib.dcn_shape(explicit, (2, 4, 1, 1), 2) == (1, 2, 1, 1)
  with pytest.raises(ConfigError, match=r'mesh.dcn_shape=\(1, 2, 1, 1\)'):
    mesh_lib.dcn_shape(explicit, (2, 4, 1, 1), 4)
  with pytest.raises(ConfigError, match='set mesh.dcn_shape'):
    mesh_lib.dcn_shape(cfg, (1, 3, 1, 1), 2)


def test_every_process_count_sees_the_same_global_stream_and_seek_repositions():
  tokens = np.arange(20000, dtype=np.int32)
  make = lambda p, n: iter(
    pipeline.train_dataset(
      tokens,
      schema.DataConfig(seed=3),
      seq_len=16,
      global_batch_size=8,
      process_index=p,
      process_count=n,
    )
  )
  one = make(0, 1)
  batches = [next(one)['inputs'] for _ in range(5)]
  two = [make(p, 2) for p in range(2)]
  for i in range(5):
    rows = np.concatenate([next(it)['inputs'] for it in two])
    assert sorted(map(tuple, rows)) == sorted(map(tuple, batches[i]))
  for p in range(2):  # a checkpoint at step 3 written by one process, resumed on two
    it = make(p, 2)
    pipeline.seek(it, 3)
    np.testing.assert_array_equal(next(it)['inputs'], batches[3][p::2])


def test_checkpoint_knows_how_many_processes_wrote_it(tmp_path):
  ckpt = Checkpointer(str(tmp_path), schema.CheckpointConfig(), read_only=True)
  data = tmp_path / 'checkpoints' / '10' / 'data'
  data.mkdir(parents=True)
  assert ckpt.data_process_count(10) is None
  for i in range(2):
    (data / f'process_{i}-of-2.json').write_text('{"next_index": 10}')
  assert ckpt.data_process_count(10) == 2


def test_launcher_stops_the_others_and_reports_the_first_failure(capfd):
  script = (
    'import os, sys, time\n'
    'if os.environ["ROUTED_PROCESS_ID"] == "1":\n'
    '  print("error: process one broke", flush=True); sys.exit(3)\n'
    'time.sleep(600)\n'
  )
  t0 = time.monotonic()
  code = launch.launch([sys.executable, '-c', script], num_processes=2, grace=1.0)
  assert code == 3 and time.monotonic() - t0 < 30
  assert 'process 1 failed first: error: process one broke' in capfd.readouterr().err


# ----------------------------------------------------------------------------- real processes


def _cfg(cache_dir, **train):
  c = tiny.get_config()
  c.data.cache_dir = str(cache_dir)
  c.train.update(log_every=1, **train)
  return schema.load(c, jax.device_count())


def _train_args(workdir, cache_dir, *extra):
  return train_command(workdir, cache_dir, '--config.train.log_every=1', *extra)


def _launch(args, **kw):
  """Runs train.train as 2 processes x 4 CPU devices; returns the launcher's exit code."""
  cwd = os.getcwd()
  os.chdir(ROOT)
  try:
    return launch.launch(args, num_processes=2, devices_per_process=4, grace=60.0, **kw)
  finally:
    os.chdir(cwd)


def _losses(workdir):
  return {r['step']: r['loss'] for r in metrics_rows(workdir) if 'loss' in r}


@pytest.fixture(scope='module')
def cache_dir(tmp_path_factory):
  path = tmp_path_factory.mktemp('corpus')
  corpus.resolve_dataset(_cfg(path).data)  # prepared once, before any process starts
  return path


@pytest.fixture(scope='module')
def reference(tmp_path_factory, cache_dir):
  """One process, 8 devices, 20 steps."""
  workdir = tmp_path_factory.mktemp('one_process')
  train_and_evaluate(_cfg(cache_dir), str(workdir))
  return _losses(workdir)


@pytest.mark.slow
def test_two_processes_train_like_one_and_resume_across_process_counts(
  tmp_path, cache_dir, reference
):
  workdir = tmp_path / 'two'
  # 2 processes stop at step 10 (checkpoint), then 2 processes resume to 20.
  assert _launch(_train_args(workdir, cache_dir, '--config.train.stop_after=10')) == 0
  shutil.copytree(workdir, tmp_path / 'one_after_two')
  assert _launch(_train_args(workdir, cache_dir)) == 0
  two = _losses(workdir)
  assert sorted(two) == sorted(reference) == list(range(1, 21))
  for step in reference:  # same global batches, same math up to reduction order
    np.testing.assert_allclose(two[step], reference[step], rtol=2e-5, err_msg=f'step {step}')
  ckpt = Checkpointer(str(workdir), schema.CheckpointConfig(), read_only=True)
  assert ckpt.data_process_count(20) == 2

  # The 2-process checkpoint of step 10 resumes in this single process on an FSDP mesh.
  other = tmp_path / 'one_after_two'
  cfg = _cfg(cache_dir)
  cfg = schema.from_dict({**cfg.to_dict(), 'mesh': {'shape': (1, -1, 1, 1), 'rules': 'fsdp'}})
  train_and_evaluate(cfg, str(other))
  resumed = _losses(other)
  for step in range(11, 21):
    np.testing.assert_allclose(resumed[step], reference[step], rtol=2e-5, err_msg=f'step {step}')


@pytest.mark.slow
def test_two_processes_train_on_a_bucket_like_one(bucket, cache_dir, reference):
  """A pod slice's layout on one machine: both processes write their checkpoint shards and
  iterator states to the same gs:// workdir, process 0 alone writes metrics; same numbers."""
  workdir = f'{bucket}/two'
  assert _launch(_train_args(workdir, cache_dir, '--config.train.stop_after=10')) == 0
  assert _launch(_train_args(workdir, cache_dir)) == 0  # resumed from the bucket
  two = _losses(workdir)
  assert sorted(two) == list(range(1, 21))
  for step in reference:
    np.testing.assert_allclose(two[step], reference[step], rtol=2e-5, err_msg=f'step {step}')
  assert (
    Checkpointer(workdir, schema.CheckpointConfig(), read_only=True).data_process_count(20) == 2
  )


def test_a_workdir_the_processes_do_not_share_is_refused(tmp_path):
  """The same relative --workdir names a different directory in each process (as each host's own
  disk would): every process stops with one line, before the lock or any checkpoint."""
  port = launch.free_port()
  args = _train_args('run', tmp_path / 'corpus', '--config.train.steps=20')  # refused before use
  args[3] = f'--config={ROOT}/configs/tiny.py'
  procs = []
  for i in range(2):
    (tmp_path / f'host{i}').mkdir()
    env = dict(launch.process_env(i, 2, port, 4), PYTHONPATH=ROOT)
    procs.append(
      subprocess.Popen(
        args, cwd=tmp_path / f'host{i}', env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        text=True,
      )
    )  # fmt: skip
  errors = [p.communicate(timeout=240)[1] for p in procs]
  for i, (p, err) in enumerate(zip(procs, errors)):
    assert p.returncode != 0, err[-2000:]
    assert 'processes of this run do not all see the same files there' in err, err[-2000:]
    assert 'Traceback' not in err
    assert sorted(os.listdir(tmp_path / f'host{i}' / 'run')) == []


@pytest.mark.slow
def test_a_killed_process_stops_the_other_within_bounded_time(tmp_path, cache_dir):
  workdir = tmp_path / 'killed'
  args = _train_args(
    workdir,
    cache_dir,
    '--config.train.steps=100000',
    '--config.checkpoint.every_steps=100000',
    '--heartbeat_timeout=10',
  )
  port = launch.free_port()
  procs = [
    subprocess.Popen(
      args,
      cwd=ROOT,
      env=launch.process_env(i, 2, port, 4),
      stdout=subprocess.DEVNULL,
      stderr=subprocess.PIPE,
      text=True,
    )
    for i in range(2)
  ]
  metrics = workdir / 'metrics.jsonl'
  deadline = time.time() + 300
  while time.time() < deadline and (not metrics.exists() or metrics.stat().st_size == 0):
    assert all(p.poll() is None for p in procs), procs[0].communicate()[1][-3000:]
    time.sleep(0.5)
  procs[1].send_signal(signal.SIGKILL)
  t0 = time.monotonic()
  try:
    _, err = procs[0].communicate(timeout=120)
  finally:
    for p in procs:
      p.kill()
  assert procs[0].returncode != 0, err[-3000:]
  assert time.monotonic() - t0 < 120


@pytest.mark.slow
def test_a_failing_process_stops_the_other_with_its_message(tmp_path, cache_dir):
  """Process 1 alone gets a bad config: it exits with its one-line error, and process 0, which
  then fails in a collective, stops with that message instead of hanging."""
  args = _train_args(
    tmp_path / 'failing', cache_dir, '--config.train.steps=200', '--heartbeat_timeout=10'
  )
  port = launch.free_port()
  procs = [
    subprocess.Popen(
      args + (['--config.optimizer.learning_rate=-1.0'] if i else []),
      cwd=ROOT,
      env=launch.process_env(i, 2, port, 4),
      stdout=subprocess.DEVNULL,
      stderr=subprocess.PIPE,
      text=True,
    )
    for i in range(2)
  ]
  try:
    errs = [p.communicate(timeout=240)[1] for p in procs]
  finally:
    for p in procs:
      p.kill()
  assert [p.returncode for p in procs] == [1, 1]
  assert 'error: optimizer.learning_rate=-1.0: expected a positive value' in errs[1]
  assert (
    'error: stopped because process 1: optimizer.learning_rate=-1.0: expected a positive value'
  ) in errs[0]


@pytest.mark.slow
def test_a_checkpoint_damaged_in_one_process_is_passed_over_by_all(tmp_path, cache_dir, reference):
  """Step 10's data-iterator state of process 1 only is damaged: process 0 alone could restore
  step 10, but both agree to move it aside and resume from step 5, then match the reference."""
  workdir = tmp_path / 'damaged'
  every = '--config.checkpoint.every_steps=5'
  assert _launch(_train_args(workdir, cache_dir, every, '--config.train.stop_after=10')) == 0
  (workdir / 'checkpoints' / '10' / 'data' / 'process_1-of-2.json').write_text('{"next_in')
  assert _launch(_train_args(workdir, cache_dir, every)) == 0
  assert [p.name.split('-')[0] for p in (workdir / 'checkpoints_damaged').iterdir()] == ['10']
  resumed = _losses(workdir)
  for step in range(6, 21):
    np.testing.assert_allclose(resumed[step], reference[step], rtol=2e-5, err_msg=f'step {step}')
