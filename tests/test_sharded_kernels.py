"""Kernels XLA cannot partition (Pallas splash attention, the megablox grouped matmul) run per
device shard under a bound mesh (`model.axes.shard_call`) and equal their unsharded reference:
values and gradients, in Pallas interpret mode on the 8 CPU devices.

Without this a TPU run with more than one device failed to compile ("Mosaic kernels cannot be
automatically partitioned"); `python -m train.plan` found it.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import sharding
from configs.schema import MeshConfig
from model import axes, flash, moe, router
from model.attention import causal_attention
from train import mesh as mesh_lib


def normal(shape, seed):
  return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), jnp.float32)


def _values_and_grads(fn, args, preset=None, shape=None):
  """fn's output and the gradients of a fixed projection of it, jitted under `preset`'s mesh."""
  cot = normal(jax.eval_shape(fn, *args).shape, 99)

  def run(*a):
    out = fn(*a)
    return out, jax.grad(lambda *b: jnp.sum(fn(*b) * cot), argnums=tuple(range(len(a))))(*a)

  if preset is None:
    return jax.jit(run)(*args)
  mesh = mesh_lib.make_mesh(MeshConfig(shape=shape, rules=preset))
  with axes.axis_rules(mesh, sharding.rules(preset)):
    return jax.jit(run)(*args)


def _close(got, want):
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5 * float(np.abs(b).max()))


@pytest.mark.parametrize(
  'kv_heads, shape',
  [(2, (2, 2, 2, 1)), (1, (2, 2, 2, 1))],
  ids=['heads_split', 'one_kv_head_kept_whole'],
)
def test_splash_per_shard_equals_the_reference(kv_heads, shape):
  """Rows over data x fsdp, heads over tensor (fsdp_tp); one kv head cannot split, so the
  heads stay whole on every device."""
  b, l, h, kd = 4, 32, 4, 16
  seg = jnp.asarray([[1] * 10 + [2] * 22] * 2 + [[3] * 32] * 2, jnp.int32)
  args = (
    normal((b, l, h, kd), 1),
    normal((b, l, kv_heads, kd), 2),
    normal((b, l, kv_heads, kd), 3),
  )
  splash = functools.partial(
    flash.flash_attention, segment_ids_BL=seg, impl='splash', interpret=True
  )
  want = _values_and_grads(functools.partial(causal_attention, segment_ids_BL=seg), args)
  _close(_values_and_grads(splash, args, 'fsdp_tp', shape), want)


@pytest.mark.parametrize('kernel', ['megablox', 'blas'])
def test_custom_call_dropless_per_shard_equals_the_reference(kernel):
  """Tokens over data x fsdp x expert (fsdp_ep): each device sorts its own tokens; the expert
  weights are gathered whole. megablox in Pallas interpret mode; blas the host BLAS custom call."""
  t, e, k, d, f = 32, 4, 2, 16, 32
  keys = jax.random.split(jax.random.PRNGKey(0), 5)
  x = jax.random.normal(keys[0], (t, d))
  logits = jax.random.normal(keys[1], (t, e)) * 2.0
  ws = tuple(
    jax.random.normal(kk, s) * 0.2 for kk, s in zip(keys[2:], ((e, d, f), (e, d, f), (e, f, d)))
  )

  def layer(kernel):
    def run(x, logits, *ws):
      weights, experts = router.topk_route(logits, k)
      if kernel is None:
        return moe.experts_reference(x, weights, experts, *ws)
      return moe.experts_dropless(x, weights, experts, *ws, impl=kernel, interpret=True)

    return run

  want = _values_and_grads(layer(None), (x, logits, *ws))
  _close(_values_and_grads(layer(kernel), (x, logits, *ws), 'fsdp_ep', (2, 2, 1, 2)), want)
