"""Command-line parsing that turns every flag or config-override mistake into one clear line, and
keeps the console to the run's own lines (library INFO logging only with an explicit --verbosity)."""

import importlib.util
import logging
import os
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


def leave_out_absent_tpu() -> None:
  """libtpu (the `tpu` extra, for `train.plan`) on a machine without TPU chips makes jax start
  the TPU runtime, which prints warnings and finds nothing. There, with no GPU plugin installed
  and JAX_PLATFORMS unset, jax starts on the CPU alone."""
  if 'JAX_PLATFORMS' in os.environ or importlib.util.find_spec('libtpu') is None:
    return
  names = {(d.metadata['Name'] or '').lower().replace('_', '-') for d in metadata.distributions()}
  if any(n.startswith(('jax-cuda', 'jax-rocm')) for n in names):
    return
  try:  # jax's own test of the PCI bus for TPU chips
    from jax._src import hardware_utils  # pylint: disable=g-import-not-at-top

    chips = hardware_utils.num_available_tpu_chips_and_device_id()[0]
  except Exception:  # pylint: disable=broad-except  (a jax without it: leave jax as it is)
    return
  if chips == 0:
    import jax  # pylint: disable=g-import-not-at-top

    jax.config.update('jax_platforms', 'cpu')


def parse_flags(argv: list[str]) -> list[str]:
  """absl flag parsing for `app.run(..., flags_parser=parse_flags)`; exits 2 with one line on error."""
  leave_out_absent_tpu()
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
