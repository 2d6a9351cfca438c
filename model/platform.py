"""The platform that kernels are chosen for: this process's backend, or the target of an
ahead-of-time compilation (`train.plan` compiles TPU programs in a CPU process).

`attention.impl='auto'` and `moe.gmm_impl='auto'` resolve through `current()`, so a plan for a TPU
topology compiles the TPU kernels (splash attention, megablox), as `train.py` on that TPU would.
"""

import contextlib
import contextvars

import jax

_TARGET = contextvars.ContextVar('target_platform', default=None)


def current() -> str:
  """'cpu' | 'gpu' | 'tpu': the compilation target when one is set, else the default backend."""
  return _TARGET.get() or jax.default_backend()


@contextlib.contextmanager
def compiling_for(platform: str):
  """Within the block, kernels are chosen (and checked) for `platform`."""
  token = _TARGET.set(platform)
  try:
    yield
  finally:
    _TARGET.reset(token)
