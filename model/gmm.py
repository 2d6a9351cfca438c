"""Grouped-matmul kernels for the dropless MoE path, chosen by name (`moe.gmm_impl`).

`y[rows of group g] = x[rows of group g] @ w[g]`, rows sorted by group, `sizes_G` rows each.
- 'scan': groups padded to blocks, a scan multiplies each block by its expert's SwiGLU weights
  (`model.moe._blocked`); exact and fast where XLA has no grouped matmul (CPU). Runs everywhere.
- 'blas': the experts' whole SwiGLU (`ragged_swiglu`) in one host call forward and one backward,
  single-threaded sgemms from NumPy's OpenBLAS per group, an XLA FFI custom call built on first
  use (model/host_blas.py); CPU and float32 only, no padding.
- 'ragged_dot': `jax.lax.ragged_dot`. Exact, but XLA:CPU and XLA:GPU (this jaxlib) lower it
  densely over every group (E times the FLOPs), so 'auto' never picks it.
- 'megablox': the Pallas TPU kernel `jax.experimental.pallas.ops.tpu.megablox.gmm` (its own VJP:
  gmm and tgmm). Rows are padded with zeros to the row tile (exact: zero rows add nothing).
  On CPU it runs only in Pallas interpret mode (tests).
- 'mgpu': the Pallas Mosaic-GPU kernels `ragged_dot_mgpu` (forward and input gradient, Hopper)
  and `transposed_ragged_dot_mgpu` (weight gradient), joined by `ragged_vjp`.
- 'tokamax': `tokamax.ragged_dot` restricted to its Mosaic GPU kernel: its default list ends in
  'xla', the dense fallback. tokamax 0.0.17 needs Python >= 3.12 and jax >= 0.11.1 (the `gpu`
  extra installs it there); imported lazily.
'auto' picks the fastest exact kernel of the platform: cpu -> blas for float32 where it builds, else
scan; tpu -> megablox,
gpu -> mgpu on Hopper, else tokamax if installed, else scan (never ragged_dot: dense on GPU);
for f32 on GPU scan (the GPU kernels' wgmma takes f32 as tf32, not exact).
A kernel that cannot run here is refused in one line naming what is missing: never a fallback.
"""

import functools
import importlib.util
import sys

import jax
import jax.numpy as jnp

from model import host_blas
from model import platform as target_platform
from model.config import MOE_GMM_IMPLS, ConfigError

RAGGED = ('ragged_dot', 'blas', 'megablox', 'mgpu', 'tokamax')  # the plain (x, w, sizes) kernels
PALLAS = ('megablox', 'mgpu', 'tokamax')  # the Pallas kernels (interpret mode on CPU)
UNPARTITIONED = (*PALLAS, 'blas')  # custom calls XLA cannot partition (moe.py shards them)


def _compute_capability() -> str | None:
  """The first GPU's compute capability ('9.0'), None without a GPU backend."""
  try:
    return str(jax.devices('gpu')[0].compute_capability)
  except RuntimeError:
    return None


def _has_tokamax() -> bool:
  return importlib.util.find_spec('tokamax') is not None


def missing(impl: str, platform: str, interpret: bool = False) -> str | None:
  """Why `impl` cannot run on `platform` ('cpu' | 'gpu' | 'tpu'), or None when it can.
  `interpret` runs the Pallas kernels in interpret mode (any platform; tests)."""
  if impl in ('scan', 'ragged_dot'):
    return None
  if impl == 'blas':
    return host_blas.missing(platform)
  if impl == 'megablox':
    return (
      None
      if platform == 'tpu' or interpret
      else f'needs a TPU backend (this process has {platform})'
    )
  if impl == 'mgpu':
    if platform != 'gpu':
      return f'needs a GPU backend (this process has {platform})'
    cc = _compute_capability()
    if cc is None or not cc.startswith('9'):
      return f'needs a Hopper GPU (compute capability 9.x; this process has {cc or "none"})'
    return None
  if impl == 'tokamax':
    if platform != 'gpu':
      return f'needs a GPU backend (this process has {platform})'
    if not _has_tokamax():
      py = '.'.join(map(str, sys.version_info[:2]))
      return (
        f'needs the tokamax package (Python >= 3.12, jax >= 0.11.1: pip install ".[gpu]"); '
        f'this process has Python {py} and no tokamax'
      )
    return None
  return f'expected one of {MOE_GMM_IMPLS}'


def resolve(impl: str, platform: str | None = None, interpret: bool = False, dtype=None) -> str:
  """The kernel `impl` names on `platform` (default: this process's backend); 'auto' is the
  fastest exact one for operands of `dtype` (None: 16-bit). Raises ConfigError naming what is
  missing when it cannot run."""
  platform = platform or target_platform.current()
  if impl == 'auto':
    if platform == 'tpu':
      return 'megablox'
    if platform == 'gpu' and (dtype is None or jnp.dtype(dtype).itemsize <= 2):
      for name in ('mgpu', 'tokamax'):
        if missing(name, platform) is None:
          return name
    if platform == 'cpu' and dtype is not None and jnp.dtype(dtype) == jnp.float32:
      if missing('blas', platform) is None:  # else (no NumPy OpenBLAS, no compiler): scan
        return 'blas'
    return 'scan'
  why = missing(impl, platform, interpret)
  if why:
    raise ConfigError(f'moe.gmm_impl={impl!r}: {why}')
  if impl == 'blas' and dtype is not None and jnp.dtype(dtype) != jnp.float32:
    raise ConfigError(f"moe.gmm_impl='blas': needs float32 (model.dtype); got {jnp.dtype(dtype)}")
  return impl


def check_config(model_cfg) -> None:
  """Config-load check: a model whose dropless grouped matmul cannot run here is refused."""
  resolve(model_cfg.moe.gmm_impl)


def ragged_vjp(fwd, fwd_t, tgmm):
  """A differentiable grouped matmul from forward-only kernels: `fwd(x_MK, w_GKN, sizes_G)`,
  `fwd_t(dy_MN, w_GKN, sizes_G)` (= per group dy @ w[g].T) and `tgmm(x_MK, dy_MN, sizes_G)`
  (= per group x.T @ dy, [G, K, N])."""

  @jax.custom_vjp
  def gmm(x_MK, w_GKN, sizes_G):
    return fwd(x_MK, w_GKN, sizes_G)

  def gmm_fwd(x_MK, w_GKN, sizes_G):
    return gmm(x_MK, w_GKN, sizes_G), (x_MK, w_GKN, sizes_G)

  def gmm_bwd(res, dy_MN):
    x_MK, w_GKN, sizes_G = res
    dx_MK = fwd_t(dy_MN, w_GKN, sizes_G).astype(x_MK.dtype)
    return dx_MK, tgmm(x_MK, dy_MN, sizes_G).astype(w_GKN.dtype), None

  gmm.defvjp(gmm_fwd, gmm_bwd)
  return gmm


def _megablox(x_MK, w_GKN, sizes_G, interpret):
  from jax.experimental.pallas.ops.tpu.megablox import gmm  # pylint: disable=g-import-not-at-top

  m, k, n = x_MK.shape[0], x_MK.shape[1], w_GKN.shape[2]
  tm = min(128, -(-m // 16) * 16)  # row tile: a multiple of 16 (bf16 sublanes)
  pad = -m % tm
  x_PK = jnp.pad(x_MK, ((0, pad), (0, 0)))
  sizes_G = sizes_G.at[-1].add(pad)  # zero rows in the last group: zero output, zero gradient
  tiling = (tm, min(128, k), min(128, n))
  y_PN = gmm(x_PK, w_GKN, sizes_G, x_MK.dtype, tiling, None, None, False, interpret)
  return y_PN[:m]


def _block(dim: int, what: str) -> int:
  for b in (128, 64, 32, 16):
    if dim % b == 0:
      return b
  raise ConfigError(f"moe.gmm_impl='mgpu': the {what} width {dim} must be a multiple of 16")


@functools.cache
def _mgpu():
  """The Hopper kernels joined into a differentiable grouped matmul (block sizes from the dims)."""
  from jax.experimental.pallas.ops.gpu import ragged_dot_mgpu as rd  # pylint: disable=g-import-not-at-top
  from jax.experimental.pallas.ops.gpu import transposed_ragged_dot_mgpu as trd  # pylint: disable=g-import-not-at-top

  steps = dict(max_concurrent_steps=2, grid_block_n=1)

  def fwd(x_MK, w_GKN, sizes_G, transpose_rhs=False):
    k, n = x_MK.shape[1], w_GKN.shape[1 if transpose_rhs else 2]
    blocks = dict(block_m=64, block_n=_block(n, 'output'), block_k=_block(k, 'input'))
    return rd.ragged_dot(
      x_MK, w_GKN, group_sizes=sizes_G, transpose_rhs=transpose_rhs, **blocks, **steps
    )

  def tgmm(x_MK, dy_MN, sizes_G):
    blocks = dict(block_m=_block(x_MK.shape[1], 'input'), block_n=_block(dy_MN.shape[1], 'output'))
    return trd.transposed_ragged_dot(
      x_MK, dy_MN, group_sizes=sizes_G, block_k=64, **blocks, **steps
    )

  return ragged_vjp(fwd, functools.partial(fwd, transpose_rhs=True), tgmm)


def _tokamax(x_MK, w_GKN, sizes_G):
  import tokamax  # pylint: disable=g-import-not-at-top  (Python >= 3.12 only)

  return tokamax.ragged_dot(x_MK, w_GKN, sizes_G, implementation='mosaic')


def ragged_swiglu(impl: str, x_MD, w_gate_GDF, w_up_GDF, w_down_GFD, sizes_G, interpret=False):
  """[M, D]: each group's SwiGLU on its rows (sorted, `sizes_G` each): three grouped matmuls by
  `impl`, or one fused host call each way for 'blas' (model/host_blas.py: `swiglu`)."""
  if impl == 'blas':
    return host_blas.swiglu(x_MD, w_gate_GDF, w_up_GDF, w_down_GFD, sizes_G)
  mm = lambda x_MX, w_GXY: ragged_matmul(impl, x_MX, w_GXY, sizes_G, interpret)
  return mm(jax.nn.silu(mm(x_MD, w_gate_GDF)) * mm(x_MD, w_up_GDF), w_down_GFD)


def ragged_matmul(impl: str, x_MK, w_GKN, sizes_G, interpret: bool = False):
  """[M, N]: rows of group g (sorted, `sizes_G` each) times w_GKN[g], by the kernel `impl`."""
  if impl == 'ragged_dot':
    return jax.lax.ragged_dot(x_MK, w_GKN, sizes_G)
  if impl == 'megablox':
    return _megablox(x_MK, w_GKN, sizes_G, interpret)
  if impl == 'mgpu':
    return _mgpu()(x_MK, w_GKN, sizes_G)
  if impl == 'tokamax':
    return _tokamax(x_MK, w_GKN, sizes_G)
  plain = tuple(k for k in RAGGED if k != 'blas')  # 'blas' runs only fused (ragged_swiglu)
  raise ConfigError(f'moe.gmm_impl={impl!r}: not a plain grouped matmul; expected one of {plain}')
