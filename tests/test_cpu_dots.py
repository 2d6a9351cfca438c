"""configs/cli.py `cpu_dots_flags`: on an x86-64 CPU-only jax a command starts XLA with its library
(YNNPACK) dot fusions turned off, so matrix multiplies run as XLA's Eigen dots; ROUTED_CPU_DOTS=xla
keeps XLA's default; a user's own XLA_FLAGS setting wins."""

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from configs import cli

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_X86 = cli.platform.machine().lower() in ('x86_64', 'amd64')

# A command in miniature: prepare_process, then a jitted matmul; what XLA compiled it to.
_PROBE = textwrap.dedent("""
  import json, os
  from configs import cli
  cli.prepare_process()
  import jax, jax.numpy as jnp
  x = jnp.linspace(-1.0, 1.0, 256 * 128, dtype=jnp.float32).reshape(256, 128)
  f = jax.jit(lambda a: jnp.tanh(a @ a.T) @ a)
  hlo = f.lower(x).compile().as_text()
  print(json.dumps({'xla_flags': os.environ.get('XLA_FLAGS', ''),
                    'library_dots': '__ynn_fusion' in hlo, 'y': f(x).tolist()}))
""")


def _probe(choice: str, xla_flags: str = '') -> dict:
  env = dict(os.environ, ROUTED_CPU_DOTS=choice, JAX_PLATFORMS='cpu', PYTHONPATH=_ROOT)
  env['XLA_FLAGS'] = xla_flags
  out = subprocess.run(
    [sys.executable, '-c', _PROBE], env=env, cwd=_ROOT, capture_output=True, text=True, timeout=120
  )
  assert out.returncode == 0, out.stderr[-2000:]
  lines = out.stdout.strip().splitlines()
  assert len(lines) == 1, lines
  return json.loads(lines[0])


@pytest.mark.skipif(not _X86, reason='the Eigen default applies on x86-64 only')
def test_a_command_multiplies_with_eigen_unless_told_otherwise():
  eigen, xla = _probe('eigen'), _probe('xla')
  assert cli.EIGEN_DOTS_FLAG in eigen['xla_flags'].split() and not eigen['library_dots']
  assert 'ynn_fusion_type' not in xla['xla_flags']
  # Two libraries, one product: equal to f32 rounding (the summation order differs).
  np.testing.assert_allclose(eigen['y'], xla['y'], rtol=1e-5, atol=1e-5)
  own = _probe('eigen', xla_flags='--xla_cpu_experimental_ynn_fusion_type=dot')
  assert own['xla_flags'] == '--xla_cpu_experimental_ynn_fusion_type=dot'  # the user's wins


def test_the_flag_only_where_measured_and_wanted(monkeypatch):
  monkeypatch.setattr(cli.platform, 'machine', lambda: 'x86_64')
  monkeypatch.setenv(cli.CPU_DOTS_ENV, 'eigen')
  monkeypatch.setenv('XLA_FLAGS', '--xla_force_host_platform_device_count=8')
  assert cli.cpu_dots_flags(cpu_only=True) == (
    '--xla_force_host_platform_device_count=8 ' + cli.EIGEN_DOTS_FLAG
  )
  monkeypatch.setenv('XLA_FLAGS', cli.cpu_dots_flags(cpu_only=True))  # set once: not again
  assert cli.cpu_dots_flags(cpu_only=True) is None
  monkeypatch.delenv('XLA_FLAGS')
  assert cli.cpu_dots_flags(cpu_only=True) == cli.EIGEN_DOTS_FLAG
  assert cli.cpu_dots_flags(cpu_only=False) is None  # an accelerator's host dots are not ours
  monkeypatch.setattr(cli.platform, 'machine', lambda: 'arm64')  # not measured there
  assert cli.cpu_dots_flags(cpu_only=True) is None
  monkeypatch.setattr(cli.platform, 'machine', lambda: 'AMD64')
  monkeypatch.setenv(cli.CPU_DOTS_ENV, 'xla')
  assert cli.cpu_dots_flags(cpu_only=True) is None


def test_an_unknown_choice_is_one_line_naming_the_variable(monkeypatch, capsys):
  monkeypatch.setenv(cli.CPU_DOTS_ENV, 'blas')
  monkeypatch.setenv('XLA_FLAGS', os.environ.get('XLA_FLAGS', ''))  # restored afterwards
  with pytest.raises(SystemExit) as exit_info:
    cli.prepare_process()
  assert exit_info.value.code == 2
  assert capsys.readouterr().err.strip() == "error: ROUTED_CPU_DOTS='blas': expected eigen or xla"


@pytest.mark.slow  # four worker processes compiling the smoke step; the tool is under test
def test_benchmark_smoke_runs_four_workers():
  from benchmarks import cpu_dots  # pylint: disable=g-import-not-at-top

  result = cpu_dots.run('smoke', rounds=2, steps=2)
  assert set(result['workers']) == {'dense_eigen', 'dense_xla', 'moe_eigen', 'moe_xla'}
  assert result['settings_in_effect'] == _X86
  for w in result['workers'].values():
    assert w['steps'] == 4 and 0 < w['min_s'] <= w['median_s']
