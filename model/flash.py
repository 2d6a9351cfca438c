"""Flash attention kernels of the accelerators behind one call: cuDNN (GPU) and splash (TPU).

`attention.impl` names the kernel: 'xla' is `jax.nn.dot_product_attention`'s XLA implementation
with a dense mask (the reference), 'chunked' plain XLA scoring each query chunk against its causal
key prefix only (`model.chunked_attention`, exact), 'cudnn' its cuDNN flash kernel, 'splash' the Pallas TPU
splash-attention kernel (segment ids and causal or blocked-local masks computed inside the kernel),
'auto' the platform's kernel (chunked on CPU). A kernel the platform lacks is refused in one line by `check_impl`
(at model build), never replaced silently. cuDNN gets no segment ids: `jax.nn.dot_product_attention`
would pass the segment mask to it as a dense bias (not flash), so packed rows are refused there.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np

from model import axes, chunked_attention
from model import platform as target_platform

IMPLS = ('auto', 'xla', 'chunked', 'cudnn', 'splash')
_HALF_DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
_NEEDS = {'cudnn': 'gpu', 'splash': 'tpu'}


def resolve_impl(impl: str, dtype, platform: str | None = None) -> str:
  """The kernel for a config value: 'auto' is splash on TPU, cuDNN on GPU with a half-precision
  compute dtype (the only dtypes cuDNN flash attention takes), chunked on CPU, XLA elsewhere."""
  if impl not in IMPLS:
    raise ValueError(f'attention.impl={impl!r}: expected one of {IMPLS}')
  if impl != 'auto':
    return impl
  platform = platform or target_platform.current()
  if platform == 'tpu':
    return 'splash'
  if platform == 'gpu' and jnp.dtype(dtype) in _HALF_DTYPES:
    return 'cudnn'
  return 'chunked' if platform == 'cpu' else 'xla'


def check_impl(impl: str, dtype, platform: str | None = None) -> str:
  """The resolved kernel, or a one-line ValueError naming what this process lacks for it."""
  platform = platform or target_platform.current()
  kernel = resolve_impl(impl, dtype, platform)
  need = _NEEDS.get(kernel)
  if need and platform != need:
    raise ValueError(
      f'attention.impl={impl!r}: {kernel} needs a {need.upper()} backend (this process has '
      f'{platform})'
    )
  if kernel == 'cudnn' and jnp.dtype(dtype) not in _HALF_DTYPES:
    raise ValueError(
      f'attention.impl={impl!r}: cudnn flash attention needs a bfloat16 or float16 compute '
      f'dtype (model.dtype={jnp.dtype(dtype).name})'
    )
  return kernel


def call_kernel(kernel: str, impl: str, packed: bool) -> str:
  """The kernel for one call: the build-time `kernel`, except that 'auto' keeps packed rows
  (segment ids) off cuDNN, which would take their mask only as a dense bias (then XLA)."""
  return 'xla' if kernel == 'cudnn' and packed and impl == 'auto' else kernel


def _block_local_mask(length: int, window: int):
  """Splash mask of `model.local_attention`: causal, keys of the query's block and the previous."""
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm

  class BlockLocalMask(sm._ComputableMask):
    def __init__(self):
      self.window = window
      super().__init__(
        (length, length), lambda q, kv: (kv <= q) & (kv // window >= q // window - 1)
      )

    def __eq__(self, other):
      return isinstance(other, BlockLocalMask) and (self.shape, self.window) == (
        other.shape,
        other.window,
      )

    def __hash__(self):
      return hash((BlockLocalMask, self.shape, self.window))

  return BlockLocalMask()


def _block(length: int) -> int:
  """Splash block size along the (padded) sequence: 512, 256 or 128, whichever divides it."""
  return next(b for b in (512, 256, 128) if length % b == 0)


@functools.lru_cache(maxsize=64)
def _splash_kernel(heads: int, length: int, causal: bool, local_window, interpret: bool):
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm

  shape = (length, length)
  if local_window is not None:
    one = _block_local_mask(length, local_window)
  elif causal:
    one = sm.CausalMask(shape)
  else:
    one = sm.FullMask(shape)
  b = _block(length)
  sizes = sk.BlockSizes(
    block_q=b,
    block_kv=b,
    block_kv_compute=b,
    block_q_dkv=b,
    block_kv_dkv=b,
    block_kv_dkv_compute=b,
    block_q_dq=b,
    block_kv_dq=b,
  )
  mask = sm.MultiHeadMask([one] * heads)
  with jax.ensure_compile_time_eval():  # cached: its mask arrays must not be one trace's tracers
    return sk.make_splash_mqa_single_device(mask, block_sizes=sizes, interpret=interpret)


def _splash(q_BLHK, k_BLGK, v_BLGK, segment_ids_BL, causal, local_window, scale, interpret):
  """GQA as multi-query kernels: per batch row and kv head, its H // G query heads share k, v."""
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk

  b, l, h, kd = q_BLHK.shape
  g = k_BLGK.shape[2]
  pad = -l % 128  # the kernel's blocks are multiples of 128; padding is a segment of its own (-1)
  if pad:
    seg_BL = jnp.zeros((b, l), jnp.int32) if segment_ids_BL is None else segment_ids_BL
    segment_ids_BL = jnp.pad(seg_BL.astype(jnp.int32), ((0, 0), (0, pad)), constant_values=-1)
    q_BLHK, k_BLGK, v_BLGK = (
      jnp.pad(x, ((0, 0), (0, pad), (0, 0), (0, 0))) for x in (q_BLHK, k_BLGK, v_BLGK)
    )
  kernel = _splash_kernel(h // g, l + pad, causal, local_window, interpret)
  q_BGRLK = (q_BLHK * jnp.asarray(scale, q_BLHK.dtype)).reshape(b, l + pad, g, h // g, kd)
  q_BGRLK = q_BGRLK.transpose(0, 2, 3, 1, 4)
  k_BGLK, v_BGLK = (x.transpose(0, 2, 1, 3) for x in (k_BLGK, v_BLGK))
  if segment_ids_BL is None:
    one = lambda q, k, v: kernel(q, k, v)
    out = jax.vmap(jax.vmap(one))(q_BGRLK, k_BGLK, v_BGLK)
  else:
    seg_BL = segment_ids_BL.astype(jnp.int32)
    one = lambda q, k, v, s: kernel(q, k, v, segment_ids=sk.SegmentIds(q=s, kv=s))
    per_row = lambda q, k, v, s: jax.vmap(one, (0, 0, 0, None))(q, k, v, s)
    out = jax.vmap(per_row)(q_BGRLK, k_BGLK, v_BGLK, seg_BL)
  return out.transpose(0, 3, 1, 2, 4).reshape(b, l + pad, h, kd)[:, :l]


def _sharded_splash(q_BLHK, k_BLGK, v_BLGK, segment_ids_BL, causal, local_window, scale, interpret):
  """`_splash` on each device's rows and heads: XLA cannot partition a Mosaic kernel. Heads are
  split only when query and key/value heads split alike (each device keeps whole GQA groups)."""
  ways = axes.mesh_ways('act_heads')
  split_heads = ways == axes.mesh_ways('act_kv_heads') and k_BLGK.shape[2] % ways == 0
  q_names = ('batch', 'length', 'act_heads' if split_heads else None, None)
  kv_names = ('batch', 'length', 'act_kv_heads' if split_heads else None, None)
  run = functools.partial(
    _splash, causal=causal, local_window=local_window, scale=scale, interpret=interpret
  )
  if segment_ids_BL is None:
    return axes.shard_call(
      lambda q, k, v: run(q, k, v, None),
      q_BLHK,
      k_BLGK,
      v_BLGK,
      names=(q_names, kv_names, kv_names),
    )
  return axes.shard_call(
    run,
    q_BLHK,
    k_BLGK,
    v_BLGK,
    segment_ids_BL,
    names=(q_names, kv_names, kv_names, ('batch', 'length')),
  )


def _local_mask(length: int, window: int) -> np.ndarray:
  pos = np.arange(length)
  return (pos[None, :] <= pos[:, None]) & (pos[None, :] // window >= pos[:, None] // window - 1)


def flash_attention(
  q_BLHK: jax.Array,
  k_BLGK: jax.Array,
  v_BLGK: jax.Array,
  *,
  segment_ids_BL: jax.Array | None = None,
  impl: str,
  causal: bool = True,
  local_window: int | None = None,
  scale: float | None = None,
  interpret: bool = False,
) -> jax.Array:
  """Softmax attention through kernel `impl` ('xla', 'chunked', 'cudnn' or 'splash'; resolved).

  A query sees keys of its own segment, earlier ones when `causal`; with `local_window` only those
  of its own and the previous block of that many positions (`model.local_attention`'s mask:
  splash and xla only; 'chunked' chunks causal attention only and is 'xla' otherwise).
  `interpret` runs splash in Pallas interpret mode (any backend, slow).
  """
  scale = q_BLHK.shape[-1] ** -0.5 if scale is None else scale
  if impl == 'chunked' and causal and local_window is None:
    return chunked_attention.causal_attention(
      q_BLHK, k_BLGK, v_BLGK, segment_ids_BL=segment_ids_BL, scale=scale
    )
  impl = 'xla' if impl == 'chunked' else impl
  if impl == 'splash':
    return _sharded_splash(
      q_BLHK, k_BLGK, v_BLGK, segment_ids_BL, causal, local_window, scale, interpret
    )
  if impl == 'cudnn' and segment_ids_BL is not None:
    raise ValueError(
      "attention.impl='cudnn': packed segment ids would reach cuDNN only as a dense bias; use xla"
    )
  if impl == 'cudnn' and local_window is not None:
    raise ValueError("attention.impl='cudnn': no blocked local mask in cuDNN (sliding window only)")
  if impl not in ('xla', 'cudnn'):
    raise ValueError(
      f'attention.impl={impl!r}: expected a resolved kernel (xla, chunked, cudnn, splash)'
    )
  l = q_BLHK.shape[1]
  mask = None
  if segment_ids_BL is not None:
    mask = segment_ids_BL[:, None, :, None] == segment_ids_BL[:, None, None, :]
  if local_window is not None:
    local = jnp.asarray(_local_mask(l, local_window))[None, None]
    mask = local if mask is None else mask & local
  return jax.nn.dot_product_attention(
    q_BLHK,
    k_BLGK,
    v_BLGK,
    mask=mask,
    is_causal=causal and local_window is None,
    scale=scale,
    implementation=impl,
  )
