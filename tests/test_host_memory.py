"""configs/cli.py `huge_pages_environment`: on a CPU-only jax a command restarts once with glibc's
large blocks on transparent huge pages, so a jitted program's scratch buffer stops faulting in
4 KB page by page; the results and the peak memory stay the same."""

import json
import os
import subprocess
import sys
import textwrap

import pytest

from configs import cli

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_APPLICABLE = (cli._glibc_version() or (0, 0)) >= (
  2,
  35,
) and cli._transparent_huge_pages() == 'madvise'

# A command in miniature: prepare_process (which may restart the process), then a program whose
# scratch buffer (the [4096, 4096] f32 product, 64 MB) glibc maps afresh at every call.
_PROBE = textwrap.dedent("""
  import json, os, resource, sys
  from configs import cli
  pid = os.getpid()
  cli.prepare_process()
  import jax, jax.numpy as jnp
  f = jax.jit(lambda x: jnp.tanh(x @ x.T) @ x)
  x = jnp.linspace(-1.0, 1.0, 4096 * 64, dtype=jnp.float32).reshape(4096, 64)
  y = f(x).block_until_ready()
  for _ in range(3):
    f(x).block_until_ready()
  before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
  for _ in range(5):
    f(x).block_until_ready()
  faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 5
  print(json.dumps({'tunables': os.environ.get('GLIBC_TUNABLES', ''), 'pid': pid,
                    'faults_per_call': faults, 'sum': float(y.sum()),
                    'max_rss_mb': resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
""")


def _probe(choice: str) -> dict:
  # XLA's default dots: Eigen's dots (the x86-64 default, tests/test_cpu_dots.py) allocate their
  # own packing buffers per call, too small for huge pages: 600-950 faults per call of this
  # program that are not the scratch buffer's.
  env = dict(os.environ, ROUTED_HOST_MEMORY=choice, JAX_PLATFORMS='cpu', PYTHONPATH=_ROOT)
  env['ROUTED_CPU_DOTS'] = 'xla'
  env['XLA_FLAGS'] = ''  # one device, the default compiler
  env.pop('GLIBC_TUNABLES', None)
  out = subprocess.run(
    [sys.executable, '-c', _PROBE], env=env, cwd=_ROOT, capture_output=True, text=True, timeout=120
  )
  assert out.returncode == 0, out.stderr[-2000:]
  lines = out.stdout.strip().splitlines()
  assert len(lines) == 1, lines  # the restart runs the program once, not twice
  return json.loads(lines[0])


@pytest.mark.skipif(not _APPLICABLE, reason="needs glibc >= 2.35 and huge pages on 'madvise'")
def test_the_restart_removes_the_scratch_page_faults_and_keeps_results_and_memory():
  huge, system = _probe('huge_pages'), _probe('system')
  assert cli.HUGE_PAGES_TUNABLE in huge['tunables'] and 'hugetlb' not in system['tunables']
  scratch_pages = 4096 * 4096 * 4 / 4096
  assert system['faults_per_call'] > 0.5 * scratch_pages  # the scratch buffer, every call
  assert huge['faults_per_call'] < 0.05 * scratch_pages
  assert huge['sum'] == system['sum']
  assert huge['max_rss_mb'] < 1.25 * system['max_rss_mb']


def test_no_restart_where_it_cannot_help_or_is_not_wanted(monkeypatch):
  monkeypatch.setattr(cli, '_glibc_version', lambda: (2, 36))
  monkeypatch.setattr(cli, '_transparent_huge_pages', lambda: 'madvise')
  monkeypatch.delenv('GLIBC_TUNABLES', raising=False)
  monkeypatch.setenv(cli.HOST_MEMORY_ENV, 'huge_pages')
  assert cli.huge_pages_environment(cpu_only=True)['GLIBC_TUNABLES'] == cli.HUGE_PAGES_TUNABLE
  monkeypatch.setenv('GLIBC_TUNABLES', 'glibc.malloc.arena_max=2')  # kept, the tunable added
  env = cli.huge_pages_environment(cpu_only=True)
  assert env['GLIBC_TUNABLES'] == 'glibc.malloc.arena_max=2:' + cli.HUGE_PAGES_TUNABLE
  monkeypatch.setenv('GLIBC_TUNABLES', env['GLIBC_TUNABLES'])  # after the restart: no second one
  assert cli.huge_pages_environment(cpu_only=True) is None
  monkeypatch.delenv('GLIBC_TUNABLES')
  assert cli.huge_pages_environment(cpu_only=False) is None  # an accelerator
  for thp in ('always', 'never', None):  # huge pages already, or never
    monkeypatch.setattr(cli, '_transparent_huge_pages', lambda thp=thp: thp)
    assert cli.huge_pages_environment(cpu_only=True) is None
  monkeypatch.setattr(cli, '_transparent_huge_pages', lambda: 'madvise')
  monkeypatch.setattr(cli, '_glibc_version', lambda: (2, 31))  # no such tunable before 2.35
  assert cli.huge_pages_environment(cpu_only=True) is None
  monkeypatch.setattr(cli, '_glibc_version', lambda: (2, 36))
  monkeypatch.setenv(cli.HOST_MEMORY_ENV, 'system')
  assert cli.huge_pages_environment(cpu_only=True) is None


def test_an_unknown_choice_is_one_line_naming_the_variable(monkeypatch, capsys):
  monkeypatch.setenv(cli.HOST_MEMORY_ENV, 'sometimes')
  monkeypatch.setenv('XLA_FLAGS', os.environ.get('XLA_FLAGS', ''))  # restored afterwards
  with pytest.raises(SystemExit) as exit_info:
    cli.prepare_process()
  assert exit_info.value.code == 2
  err = capsys.readouterr().err.strip()
  assert err == "error: ROUTED_HOST_MEMORY='sometimes': expected huge_pages or system"


@pytest.mark.slow  # two worker processes compiling the smoke step; the tool is under test
def test_benchmark_smoke_runs_both_workers_to_the_same_loss():
  from benchmarks import host_memory  # pylint: disable=g-import-not-at-top

  result = host_memory.run('smoke', False, rounds=2, steps=2)
  assert set(result['modes']) == {'huge_pages', 'system'} and result['same_final_loss']
  assert result['huge_pages_in_effect'] == _APPLICABLE
  for m in result['modes'].values():
    assert m['steps'] == 4 and 0 < m['min_s'] <= m['median_s'] and m['max_rss_mb'] > 0
