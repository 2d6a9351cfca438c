"""Projections over flattened tokens against the 3-D einsums they replaced (issue 22).

`model.layers.token_matmul` writes x[B, L, *in] @ w[*in, *out] as one 2-D matmul over the B·L
tokens; the SwiGLU layer runs wholly on the flattened [B·L, F] array, and the tied head likewise.
Before, each was a 3-D einsum ('bld,df->blf', 'bld,dhk->blhk', 'blhk,hkd->bld', 'bld,vd->blv'),
whose weight gradient contracts over (b, l): XLA:CPU copied both operands into transposed layouts
first. This script times, in one interleaved run each, (1) the SwiGLU layer forward and backward,
einsum form against the model's, and (2) the bare train step with the einsum forms patched back in
(the `before` variant, defined only here) against the model as it is.

Usage: python -m benchmarks.token_matmul [--shape=demo|large] [--rounds=8] [--smoke]
Hardware: any; about two minutes on 2 CPU cores at the demo shape. Writes
benchmarks/results/token_matmul_<shape>.json (--smoke: toy size, writes nowhere).
"""

import contextlib
import statistics
import sys

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from ml_collections import config_flags

from benchmarks import common, step_roofline
from model import attention, axes, layers, routing_layer


def _einsum_swiglu(x_BLD, w_gate_DF, w_up_DF, w_down_FD):
  gate_BLF = jnp.einsum('bld,df->blf', x_BLD, w_gate_DF)
  up_BLF = jnp.einsum('bld,df->blf', x_BLD, w_up_DF)
  h_BLF = axes.constrain(jax.nn.silu(gate_BLF) * up_BLF, ('batch', 'length', 'act_mlp'))
  return jnp.einsum('blf,fd->bld', h_BLF, w_down_FD)


def _einsum_token_matmul(x_BLI, w_IO):
  letters = 'ijkmnopq'
  n_in = x_BLI.ndim - 2
  ins, outs = letters[:n_in], letters[n_in : n_in + w_IO.ndim - n_in]
  return jnp.einsum(f'bl{ins},{ins}{outs}->bl{outs}', x_BLI, w_IO)


def _einsum_attend(self, x_BLD):
  table_VD = self.embedding[...].astype(self.dtype)
  return jnp.einsum(
    'bld,vd->blv', x_BLD.astype(self.dtype), table_VD, preferred_element_type=jnp.float32
  )


@contextlib.contextmanager
def einsum_forms():
  """The model as it was: 3-D einsums in the projections, the SwiGLU layer and the tied head."""
  saved = (
    layers.swiglu,
    attention.token_matmul,
    routing_layer.token_matmul,
    layers.Embedding.attend,
  )
  layers.swiglu, layers.Embedding.attend = _einsum_swiglu, _einsum_attend
  attention.token_matmul = routing_layer.token_matmul = _einsum_token_matmul
  try:
    yield
  finally:
    layers.swiglu, attention.token_matmul, routing_layer.token_matmul, layers.Embedding.attend = (
      saved
    )


def swiglu_layer(shape: dict, rounds: int) -> dict:
  """Forward + backward (all four gradients) of one SwiGLU layer at the shape's B, L, D, F."""
  rng = np.random.default_rng(0)
  draw = lambda *s: jnp.asarray(rng.standard_normal(s, dtype=np.float32) * 0.1)
  b, l, d, f = shape['batch'], shape['seq'], shape['d'], shape['mlp']
  args = (draw(b, l, d), draw(d, f), draw(d, f), draw(f, d))
  grad = lambda fn: jax.jit(jax.grad(lambda *a: jnp.sum(fn(*a) ** 2), argnums=(0, 1, 2, 3)))
  fns = {'einsum': grad(_einsum_swiglu), 'token_matmul': grad(layers.swiglu)}
  diff = max(
    float(jnp.max(jnp.abs(p - q)) / jnp.max(jnp.abs(p)))
    for p, q in zip(fns['einsum'](*args), fns['token_matmul'](*args))
  )
  calls = {k: (lambda fn=fn: jax.block_until_ready(fn(*args))) for k, fn in fns.items()}
  times = common.time_alternating(calls, rounds * 3, warmup=2)
  return {
    'median_ms': {k: statistics.median(t) * 1e3 for k, t in times.items()},
    'max_relative_gradient_difference': diff,
  }


def train_step(cfg, rounds: int) -> dict:
  """The bare jitted train step, before (einsum forms) and now, called in turn."""
  with einsum_forms():
    before = step_roofline.random_batch_step(cfg)[0]
    before()  # traced and compiled with the einsum forms
  now = step_roofline.random_batch_step(cfg)[0]
  now()
  times = common.time_alternating({'before': before, 'now': now}, rounds, warmup=1)
  out = {
    k: {'median_ms': statistics.median(t) * 1e3, 'min_ms': min(t) * 1e3} for k, t in times.items()
  }
  out['now_over_before'] = out['now']['median_ms'] / out['before']['median_ms']
  return out


def main(argv):
  del argv
  shape = 'smoke' if _SMOKE.value else _SHAPE.value
  if shape not in step_roofline.SHAPES:
    print(f'token_matmul: unknown shape {shape!r}; known: demo, large', file=sys.stderr)
    sys.exit(1)
  rounds = 2 if _SMOKE.value else _ROUNDS.value
  cfg = step_roofline.build_config(_CONFIG.value, shape, moe=False)
  result = {
    'benchmark': 'token_matmul',
    'device': common.device_description(),
    'jax': jax.__version__,
    'shape': step_roofline.SHAPES[shape],
    'swiglu_layer_forward_backward': swiglu_layer(step_roofline.SHAPES[shape], rounds),
    'train_step': train_step(cfg, rounds),
  }
  print(result['swiglu_layer_forward_backward'])
  print(result['train_step'])
  if not _SMOKE.value:
    result['command'] = 'python -m benchmarks.token_matmul ' + ' '.join(sys.argv[1:])
    print(f'wrote {common.write_result(f"token_matmul_{shape}", result)}')


if __name__ == '__main__':
  _CONFIG = config_flags.DEFINE_config_file('config', 'configs/demo.py', 'Experiment config.')
  _SHAPE = flags.DEFINE_string('shape', 'demo', 'Model shape: demo | large.')
  _ROUNDS = flags.DEFINE_integer('rounds', 8, 'Interleaved rounds of the train steps.')
  _SMOKE = flags.DEFINE_bool('smoke', False, 'Toy size in seconds; writes nothing.')
  app.run(main)
