"""The 'blas' kernel of the dropless MoE on CPU: the experts' SwiGLU with sgemms per expert's rows.

XLA:CPU has no grouped matmul (ragged_dot runs densely over every group), and the 'scan' kernel
pads each expert's rows to blocks and pays a scan's bookkeeping per block. This kernel is an XLA
FFI custom call (model/blas_gmm.cc) that calls NumPy's bundled OpenBLAS (`scipy_cblas_sgemm64_`)
on each group's rows, without padding. The library is compiled on first use with the C++ compiler (`$CXX`, else `c++`)
against jaxlib's FFI headers and cached under $ROUTED_CACHE (else ~/.cache/routed_transformers),
keyed by the source and the jaxlib version. float32 only. `missing()` says why it cannot run.

`swiglu` runs the experts' whole SwiGLU in one call forward and one backward: each task keeps its
rows' hidden activations in a cache-sized buffer, and a layer wakes the thread pool twice instead
of nine times (three grouped matmuls forward and six backward).
"""

import ctypes
import functools
import glob
import hashlib
import os
import shutil
import subprocess
import tempfile

import jax
import jax.numpy as jnp
import jaxlib
import numpy as np

_SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'blas_gmm.cc')  # local: source
_SYMBOLS = {  # FFI target: symbol of model/blas_gmm.cc
  'routed_swiglu_forward': 'RoutedSwigluForward',
  'routed_swiglu_backward': 'RoutedSwigluBackward',
}


def _openblas() -> str | None:
  """NumPy's bundled OpenBLAS (Linux wheels), None where NumPy links another BLAS."""
  libs = os.path.join(os.path.dirname(os.path.dirname(np.__file__)), 'numpy.libs')
  found = sorted(glob.glob(os.path.join(libs, 'libscipy_openblas64_*.so')))
  return found[0] if found else None


def _library_path() -> str:
  with open(_SOURCE, 'rb') as f:
    key = hashlib.sha256(f.read() + jaxlib.__version__.encode()).hexdigest()[:16]
  root = os.environ.get('ROUTED_CACHE') or os.path.expanduser('~/.cache/routed_transformers')
  return os.path.join(root, 'blas_gmm', key, 'libblas_gmm.so')


def _build(path: str) -> None:
  compiler = os.environ.get('CXX') or 'c++'
  if shutil.which(compiler) is None:
    raise RuntimeError(f'needs a C++ compiler to build the kernel ({compiler!r} not found)')
  os.makedirs(os.path.dirname(path), exist_ok=True)
  fd, tmp = tempfile.mkstemp(suffix='.so', dir=os.path.dirname(path))
  os.close(fd)
  cmd = [compiler, '-O3', '-shared', '-fPIC', '-std=c++17', '-w', f'-I{jax.ffi.include_dir()}',
         _SOURCE, '-o', tmp, '-ldl']  # fmt: skip
  out = subprocess.run(cmd, capture_output=True, text=True, check=False)
  if out.returncode != 0:
    os.remove(tmp)
    last = (out.stderr.strip().splitlines() or ['no output'])[-1]
    raise RuntimeError(f'building model/blas_gmm.cc failed: {last}')
  os.replace(tmp, path)  # atomic: concurrent builders leave one whole library


@functools.cache
def _register() -> str | None:
  """Build (once), load and register the kernel; None when done, else why it cannot run."""
  blas = _openblas()
  if blas is None:
    return "needs NumPy's bundled OpenBLAS (a Linux NumPy wheel)"
  try:
    path = _library_path()
    if not os.path.exists(path):
      _build(path)
    ctypes.CDLL(blas, mode=ctypes.RTLD_GLOBAL)
    lib = ctypes.cdll.LoadLibrary(path)
    for target, symbol in _SYMBOLS.items():
      jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(lib, symbol)), platform='cpu')
  except (RuntimeError, OSError) as e:
    return str(e)
  return None


def missing(platform: str) -> str | None:
  """Why the kernel cannot run on `platform`, or None when it can (builds it the first time)."""
  if platform != 'cpu':
    return f'needs the CPU backend (this process has {platform})'
  return _register()


def _ready(target: str) -> str:
  """`target`, registered (built the first time); RuntimeError in one line where it cannot be."""
  why = _register()
  if why is not None:
    raise RuntimeError(f'the host BLAS kernel cannot run here: {why}')
  return target


def _f32(*shapes):
  return tuple(jax.ShapeDtypeStruct(s, jnp.float32) for s in shapes)


@jax.custom_vjp
def swiglu(x_MD, w_gate_GDF, w_up_GDF, w_down_GFD, sizes_G):
  """[M, D]: (silu(x @ w_gate[g]) * (x @ w_up[g])) @ w_down[g] on the rows of each group g
  (sorted, `sizes_G` each); rows past the groups: 0."""
  return _swiglu_fwd(x_MD, w_gate_GDF, w_up_GDF, w_down_GFD, sizes_G)[0]


def _swiglu_fwd(x_MD, w_gate_GDF, w_up_GDF, w_down_GFD, sizes_G):
  m, d, f = *x_MD.shape, w_gate_GDF.shape[2]
  sizes_G = sizes_G.astype(jnp.int32)
  call = jax.ffi.ffi_call(_ready('routed_swiglu_forward'), _f32((m, d), (m, f), (m, f)))
  y_MD, gate_MF, up_MF = call(x_MD, w_gate_GDF, w_up_GDF, w_down_GFD, sizes_G)
  return y_MD, (x_MD, w_gate_GDF, w_up_GDF, w_down_GFD, sizes_G, gate_MF, up_MF)


def _swiglu_bwd(res, dy_MD):
  x_MD, w_gate_GDF, w_up_GDF, w_down_GFD, sizes_G, gate_MF, up_MF = res
  m, f = gate_MF.shape
  outs = _f32(x_MD.shape, w_gate_GDF.shape, w_up_GDF.shape, w_down_GFD.shape, *[(m, f)] * 3)
  call = jax.ffi.ffi_call(_ready('routed_swiglu_backward'), outs)
  dx, dwg, dwu, dwd, *_ = call(
    x_MD, w_gate_GDF, w_up_GDF, w_down_GFD, sizes_G, gate_MF, up_MF, dy_MD
  )
  return dx, dwg, dwu, dwd, None


swiglu.defvjp(_swiglu_fwd, _swiglu_bwd)
