"""Tests run on 8 fake CPU devices; set before jax is imported anywhere."""

import os
import sys

# The tests' programs are tiny: compiling them is most of the suite's time, and XLA's backend
# optimisation level 0 halves it (204 s against 299 s for the default run on 2 cores). `make
# test-all` (ROUTED_TEST_FULL_XLA=1) compiles at XLA's default level, as training does.
_OPT = '' if os.environ.get('ROUTED_TEST_FULL_XLA') else ' --xla_backend_optimization_level=0'
os.environ['XLA_FLAGS'] = (
  os.environ.get('XLA_FLAGS', '') + ' --xla_force_host_platform_device_count=8' + _OPT
).strip()
os.environ.setdefault('JAX_PLATFORMS', 'cpu')
# A persistent compilation cache: the tests compile the same tiny programs many times (every run
# of a tiny config, in this process and in the subprocesses it starts). Set before jax is imported.
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
os.environ.setdefault('JAX_COMPILATION_CACHE_DIR', os.path.join(_ROOT, '.cache', 'jax-tests'))
os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS', '0')
os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES', '0')
sys.path.insert(0, _ROOT)

from configs import cli  # noqa: E402  (absl only: no jax yet)

# As every command arranges on a CPU-only jax: glibc's large blocks on huge pages in the commands
# the tests start; pytest itself is not restarted (its commands then find the tunable set).
_HUGE_PAGES = cli.huge_pages_environment(cpu_only=True)
if _HUGE_PAGES:
  os.environ['GLIBC_TUNABLES'] = _HUGE_PAGES['GLIBC_TUNABLES']
# As every command does on an x86-64 CPU-only jax, pytest too multiplies with XLA's Eigen dots.
_DOTS = cli.cpu_dots_flags(cpu_only=True)
if _DOTS:
  os.environ['XLA_FLAGS'] = _DOTS

import pytest  # noqa: E402  (the environment above must be set before any import of jax)


@pytest.fixture(scope='session')
def cache_dir(tmp_path_factory):
  """One default-corpus cache for the training tests of a test process."""
  return tmp_path_factory.mktemp('corpus')


@pytest.fixture(scope='session')
def uninterrupted(tmp_path_factory, cache_dir):  # pylint: disable=redefined-outer-name
  """(workdir, cfg) of configs/tiny.py trained 16 steps without a stop: the reference that
  resumed, interrupted and damaged runs must reproduce exactly."""
  from tests.tiny_runs import tiny_train_config  # pylint: disable=g-import-not-at-top
  from train.train import train_and_evaluate  # pylint: disable=g-import-not-at-top

  workdir = tmp_path_factory.mktemp('straight')
  cfg = tiny_train_config(cache_dir, steps=16, log_every=1)
  train_and_evaluate(cfg, str(workdir))
  return workdir, cfg


@pytest.fixture(scope='session')
def gcs_server():
  """A local fake-gcs-server (127.0.0.1, a free port) for the whole test process, reached through
  the environment variables a user sets for an emulator; stopped at the end."""
  from tests.gcs import start_fake_gcs  # pylint: disable=g-import-not-at-top

  with start_fake_gcs() as url:
    yield url


@pytest.fixture
def bucket(gcs_server, request):  # pylint: disable=redefined-outer-name
  """A new empty bucket on the local server: 'gs://NAME'."""
  from tests.gcs import create_bucket  # pylint: disable=g-import-not-at-top

  return create_bucket(gcs_server, request.node.name)
