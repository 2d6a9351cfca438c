"""Command-line parsing that turns every flag or config-override mistake into one clear line, and
keeps the console to the run's own lines (library INFO logging only with an explicit --verbosity).
Before parsing, `prepare_process` sets up the process: jax on the CPU alone where a TPU runtime is
installed without chips, and on a CPU-only jax Eigen matrix multiplies and glibc's large blocks on
huge pages."""

import ctypes
import importlib.util
import logging
import os
import platform
import re
import sys
from importlib import metadata

from absl import flags
from absl import logging as absl_logging

_PROJECT = os.path.dirname(os.path.dirname(os.path.abspath(__file__))) + os.sep  # local: source


class _OwnInfoOnly(logging.Filter):
  """Passes warnings and errors from anywhere, and lower levels only from this project's code."""

  def filter(self, record: logging.LogRecord) -> bool:
    path = os.path.abspath(record.pathname)  # local: a Python source file's name
    return record.levelno >= logging.WARNING or (
      path.startswith(_PROJECT) and 'site-packages' not in path
    )


def quiet_libraries() -> None:
  """Hides other libraries' INFO lines (Orbax writes ~10 per checkpoint) unless --verbosity was
  given; this project's own INFO lines (progress, resumes) stay."""
  if flags.FLAGS.is_parsed() and flags.FLAGS['verbosity'].present:
    return
  handler = absl_logging.get_absl_handler()
  if not any(isinstance(f, _OwnInfoOnly) for f in handler.filters):
    handler.addFilter(_OwnInfoOnly())


# Host memory on a CPU-only jax (Linux, glibc >= 2.35, transparent huge pages on 'madvise').
# XLA:CPU allocates each execution's scratch buffer anew: 418 MB for a train step at the demo
# shape. glibc maps a block that large afresh and unmaps it when freed, so every step faulted its
# scratch in 4 KB page by page: 103,000 page faults, ~0.24 s of kernel time per step on 2 cores.
# glibc's tunable `glibc.malloc.hugetlb=1` asks for transparent huge pages on those mappings: the
# faults drop ~200-fold and the step takes ~0.75x the time, with the same results and the same peak
# memory (docs/performance.md). Tunables are read when a process starts, so a command restarts
# itself once (same process id, same arguments) with the tunable added. ROUTED_HOST_MEMORY=system
# keeps glibc's defaults; accelerator runs keep them too (their host allocations are small).
HOST_MEMORY_ENV = 'ROUTED_HOST_MEMORY'  # huge_pages (the default) | system
HUGE_PAGES_TUNABLE = 'glibc.malloc.hugetlb=1'


def _glibc_version() -> tuple[int, int] | None:
  """glibc's (major, minor) where the process runs on glibc, else None."""
  if not sys.platform.startswith('linux'):
    return None
  try:
    libc = ctypes.CDLL(None)
    libc.gnu_get_libc_version.restype = ctypes.c_char_p
    major, minor = libc.gnu_get_libc_version().decode().split('.')[:2]
    return int(major), int(minor)
  except (OSError, AttributeError, ValueError):  # musl and others
    return None


def _transparent_huge_pages() -> str | None:
  """The kernel's THP mode ('always', 'madvise' or 'never'), None where it cannot be read."""
  try:
    with open('/sys/kernel/mm/transparent_hugepage/enabled') as f:  # local: a kernel setting
      return re.search(r'\[(\w+)\]', f.read()).group(1)
  except (OSError, AttributeError):
    return None


def _choice(variable: str, choices: tuple[str, ...]) -> str:
  """The environment variable's value, the first choice where unset; ValueError naming it else."""
  value = os.environ.get(variable, choices[0])
  if value not in choices:
    raise ValueError(f'{variable}={value!r}: expected {" or ".join(choices)}')
  return value


def huge_pages_environment(cpu_only: bool) -> dict | None:
  """The environment to restart this process with so that glibc puts its large blocks on
  transparent huge pages; None where that is already so, not wanted or cannot help."""
  choice = _choice(HOST_MEMORY_ENV, ('huge_pages', 'system'))
  tunables = os.environ.get('GLIBC_TUNABLES', '')
  if not cpu_only or choice == 'system' or 'glibc.malloc.hugetlb' in tunables:
    return None
  if (_glibc_version() or (0, 0)) < (2, 35) or _transparent_huge_pages() != 'madvise':
    return None
  return dict(os.environ, GLIBC_TUNABLES=':'.join(filter(None, (tunables, HUGE_PAGES_TUNABLE))))


# Matrix multiplies on a CPU-only jax (x86-64). jaxlib 0.10.2's XLA:CPU hands dots to its YNNPACK
# library fusions by default; on 2 x86 cores XLA's own Eigen dots ran the model's matmuls faster
# or as fast: the demo MoE train step took 0.91x the time, the dense one 0.99x, at the larger shape
# 0.94x (dense) and 1.00x (MoE), measured by benchmarks/cpu_dots.py (docs/performance.md); the MoE
# layer alone took ~0.84x at the demo shape. The flag below turns the
# library fusions off; it is set in XLA_FLAGS before jax starts its backend, unless XLA_FLAGS
# already names it. ROUTED_CPU_DOTS=xla keeps XLA's default; other machines (arm64) keep it too:
# nothing was measured there.
CPU_DOTS_ENV = 'ROUTED_CPU_DOTS'  # eigen (the default on x86-64) | xla
EIGEN_DOTS_FLAG = '--xla_cpu_experimental_ynn_fusion_type='


def cpu_dots_flags(cpu_only: bool) -> str | None:
  """The XLA_FLAGS this process should start jax with so that XLA:CPU multiplies with Eigen; None
  where they are already so, not wanted or not measured."""
  choice = _choice(CPU_DOTS_ENV, ('eigen', 'xla'))
  xla_flags = os.environ.get('XLA_FLAGS', '')
  if not cpu_only or choice == 'xla' or 'xla_cpu_experimental_ynn_fusion_type' in xla_flags:
    return None
  if platform.machine().lower() not in ('x86_64', 'amd64'):
    return None
  return ' '.join(filter(None, (xla_flags.strip(), EIGEN_DOTS_FLAG)))


def _gpu_plugin_installed() -> bool:
  names = {(d.metadata['Name'] or '').lower().replace('_', '-') for d in metadata.distributions()}
  return any(n.startswith(('jax-cuda', 'jax-rocm')) for n in names)


def _tpu_chips() -> int | None:
  """TPU chips on the PCI bus by jax's own test; None where jax has no such test."""
  try:
    from jax._src import hardware_utils  # pylint: disable=g-import-not-at-top

    return hardware_utils.num_available_tpu_chips_and_device_id()[0]
  except Exception:  # pylint: disable=broad-except  (a jax without it: leave jax as it is)
    return None


def leave_out_absent_tpu() -> bool:
  """libtpu (the `tpu` extra, for `train.plan`) on a machine without TPU chips makes jax start
  the TPU runtime, which prints warnings and finds nothing. There, with no GPU plugin installed
  and JAX_PLATFORMS unset, jax starts on the CPU alone. True when jax will run on the CPU only."""
  if 'JAX_PLATFORMS' in os.environ:
    return os.environ['JAX_PLATFORMS'].strip().lower() == 'cpu'
  if _gpu_plugin_installed():
    return False
  if importlib.util.find_spec('libtpu') is None:
    return True
  if _tpu_chips() != 0:
    return False
  import jax  # pylint: disable=g-import-not-at-top

  jax.config.update('jax_platforms', 'cpu')
  return True


def prepare_process() -> None:
  """Before jax's first computation: leave an absent TPU out, and on a CPU-only jax multiply with
  Eigen (`cpu_dots_flags`) and restart once with glibc's large blocks on huge pages
  (`huge_pages_environment`)."""
  try:
    cpu_only = leave_out_absent_tpu()
    xla_flags = cpu_dots_flags(cpu_only)
    if xla_flags is not None:  # before jax's backend starts (it reads XLA_FLAGS once)
      os.environ['XLA_FLAGS'] = xla_flags
    env = huge_pages_environment(cpu_only)
  except ValueError as e:
    print(f'error: {e}', file=sys.stderr)
    sys.exit(2)
  if env is not None and getattr(sys, 'orig_argv', None):
    sys.stdout.flush()
    sys.stderr.flush()
    try:
      os.execve(sys.executable, sys.orig_argv, env)
    except OSError:  # the restart is an optimisation: carry on with glibc's defaults
      pass


def parse_flags(argv: list[str]) -> list[str]:
  """absl flag parsing for `app.run(..., flags_parser=parse_flags)`; exits 2 with one line on error."""
  prepare_process()
  try:
    remaining = flags.FLAGS(argv)
    quiet_libraries()
    return remaining
  except flags.Error as e:
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    message = lines[0]
    if 'Traceback (most recent call last):' in lines:  # a config file's get_config raised
      message = (
        re.sub(r'Error whilst parsing config file:?$', 'the config file did not load', message)
        + f' ({lines[-1]})'
      )
  except (AttributeError, KeyError) as e:  # ml_collections: an override names no field
    text = str(e.args[0] if e.args else e)
    key = re.search(r'[A-Za-z_]\w*', text).group()
    hint = re.search(r'Did you mean "([^"]+)"', text)
    culprit = next(
      (
        a.split('=')[0]
        for a in argv[1:]
        if a.startswith('--config.')
        and re.search(rf'[.]{re.escape(key)}(=|$|[.])', a.split('=')[0])
      ),
      f'config field {key!r}',
    )
    message = f'{culprit}: no such config field' + (
      f' (did you mean {hint.group(1)!r}?)' if hint else ''
    )
  except Exception as e:  # a config file that does not load (missing, syntax error, ...)
    message = f'{type(e).__name__}: {e}'.splitlines()[0]
  print(f'error: {message}', file=sys.stderr)
  sys.exit(2)


def config_value(holder: flags.FlagHolder):
  """The loaded ConfigDict of a config-file flag; exits 2 with one line if the file did not load."""
  try:
    value = holder.value
    value.keys()  # a file that failed to load raises here, not at .value
    return value
  except (OSError, ImportError, SyntaxError, AttributeError) as e:
    detail = [line.strip() for line in str(e).splitlines() if line.strip()][-1]
    print(f'error: --{holder.name}: the config file did not load ({detail})', file=sys.stderr)
    sys.exit(2)
