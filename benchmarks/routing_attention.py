"""Claim: routing attention grows like L^<=1.6 and beats dense causal attention from L = 4k on CPU.

One attention op, forward + backward (gradient of sum(out * cotangent) w.r.t. q, k, v), batch 1,
`--heads` heads of dimension `--head_dim`, for each L: routing attention (shared QK as in the layer,
N = L / window clusters, fixed means) vs dense causal `jax.nn.dot_product_attention` (the XLA
implementation on CPU; cuDNN on a GPU with --dtype=bfloat16). Peak memory is XLA's own account of
the compiled fwd+bwd program: `compiled.memory_analysis().temp_size_in_bytes` (the largest set of
live temporaries in its buffer assignment; arguments and outputs excluded). Dense runs whose temp
size exceeds --max_dense_gib are compiled (memory reported) but not timed.

Usage: python -m benchmarks.routing_attention [--lengths=1024,2048,4096,8192,16384] [--window=256]
"""

import math
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from benchmarks import common
from model.attention import attention_impl
from model.routing_attention import routing_attention

_LENGTHS = flags.DEFINE_list(
  'lengths', ['1024', '2048', '4096', '8192', '16384'], 'Sequence lengths.'
)
_WINDOW = flags.DEFINE_integer('window', 256, 'Routing window (tokens per cluster).')
_HEADS = flags.DEFINE_integer('heads', 2, 'Attention heads.')
_HEAD_DIM = flags.DEFINE_integer('head_dim', 64, 'Head dimension.')
_DTYPE = flags.DEFINE_string('dtype', 'float32', 'Compute dtype.')
_BUDGET = flags.DEFINE_float('seconds', 6.0, 'Timing budget per (method, length) after warm-up.')
_MAX_DENSE_GIB = flags.DEFINE_float('max_dense_gib', 8.0, 'Do not run dense programs needing more.')


def _fwd_bwd(attend):
  def loss(q, k, v, cot):
    return jnp.sum(attend(q, k, v).astype(jnp.float32) * cot)

  return jax.jit(jax.grad(loss, argnums=(0, 1, 2)))


def _programs(window: int, impl: str):
  def routed(q, k, v):
    del k  # shared QK, as in the routing heads of the layer
    h, kd = q.shape[2], q.shape[3]
    means = jax.random.normal(jax.random.key(1), (h, q.shape[1] // window, kd), q.dtype)
    return routing_attention(q, q, v, means, window=window).out_BLHK

  def dense(q, k, v):
    return jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation=impl)

  return {'routing': _fwd_bwd(routed), 'dense': _fwd_bwd(dense)}


def _measure(fn, args, budget: float) -> tuple[float, int]:
  """Median seconds per call: one warm-up call, then calls until `budget` seconds (at least 2)."""
  jax.block_until_ready(fn(*args))
  times = []
  while len(times) < 2 or (sum(times) < budget and len(times) < 20):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - t0)
  return statistics.median(times), len(times)


def _exponent(lengths, values) -> float | None:
  pts = [(math.log(l), math.log(v)) for l, v in zip(lengths, values) if v]
  if len(pts) < 2:
    return None
  x, y = np.array(pts).T
  return float(np.polyfit(x, y, 1)[0])


def main(_):
  dtype = jnp.dtype(_DTYPE.value)
  impl = attention_impl('auto', dtype)
  progs = _programs(_WINDOW.value, impl)
  rows = []
  for l in map(int, _LENGTHS.value):
    shape = (1, l, _HEADS.value, _HEAD_DIM.value)
    keys = jax.random.split(jax.random.key(0), 4)
    args = [jax.random.normal(kk, shape, dtype) for kk in keys]
    row = {'L': l}
    for name, fn in progs.items():
      compiled = fn.lower(*args).compile()
      mem = compiled.memory_analysis()
      temp = getattr(mem, 'temp_size_in_bytes', None) if mem is not None else None
      row[f'{name}_temp_MiB'] = None if temp is None else temp / 2**20
      if name == 'dense' and temp is not None and temp > _MAX_DENSE_GIB.value * 2**30:
        row[f'{name}_s'], row[f'{name}_calls'] = None, 0
        continue
      row[f'{name}_s'], row[f'{name}_calls'] = _measure(compiled, args, _BUDGET.value)
    row['speedup'] = row['dense_s'] / row['routing_s'] if row['dense_s'] else None
    row['memory_ratio'] = (
      row['dense_temp_MiB'] / row['routing_temp_MiB'] if row['routing_temp_MiB'] else None
    )
    rows.append(row)
    common.print_table([row])
  lengths = [r['L'] for r in rows]
  fit = {
    f'{n}_{kind}_exponent': _exponent(lengths, [r[f'{n}_{kind}'] for r in rows])
    for n in ('routing', 'dense')
    for kind in ('s', 'temp_MiB')
  }
  common.print_table(rows)
  print(fit)
  faster_from = next((r['L'] for r in rows if r['speedup'] and r['speedup'] > 1), None)
  path = common.write_result(
    'routing_attention',
    {
      'window': _WINDOW.value,
      'heads': _HEADS.value,
      'head_dim': _HEAD_DIM.value,
      'dtype': _DTYPE.value,
      'dense_impl': impl,
      'batch': 1,
      'memory': 'compiled.memory_analysis().temp_size_in_bytes of the fwd+bwd program',
      'rows': rows,
      **fit,
      'routing_faster_from_L': faster_from,
      'targets': {'routing_s_exponent': '<= 1.6', 'faster_than_dense_from_L': 4096},
    },
  )
  print(path)


if __name__ == '__main__':
  app.run(main)
