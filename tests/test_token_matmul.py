"""Matmuls over the flattened tokens (model.layers.token_matmul, the SwiGLU layer, the tied head)
equal the 3-D einsums they replaced, values and gradients; the benchmark that compares them
restores the model after patching the einsums back in."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from benchmarks import step_roofline, token_matmul
from model import attention, layers, routing_layer


def _draw(*shape, seed=0):
  return jnp.asarray(np.random.default_rng(seed).standard_normal(shape, dtype=np.float32))


@pytest.mark.parametrize(
  'x_shape,w_shape,spec',
  [
    ((2, 5, 8), (8, 3, 4), 'bld,dhk->blhk'),  # q, k, v projections
    ((2, 5, 3, 4), (3, 4, 8), 'blhk,hkd->bld'),  # output projection
    ((2, 5, 8), (8, 6), 'bld,df->blf'),
  ],
)
def test_token_matmul_is_the_einsum(x_shape, w_shape, spec):
  x, w = _draw(*x_shape), _draw(*w_shape, seed=1)
  np.testing.assert_allclose(layers.token_matmul(x, w), jnp.einsum(spec, x, w), rtol=1e-5)
  loss = lambda f: jax.grad(lambda x, w: jnp.sum(jnp.sin(f(x, w))), argnums=(0, 1))
  got = loss(layers.token_matmul)(x, w)
  want = loss(lambda x, w: jnp.einsum(spec, x, w))(x, w)
  for g, r in zip(got, want):
    np.testing.assert_allclose(g, r, rtol=1e-5, atol=1e-6 * float(jnp.max(jnp.abs(r))))


def test_swiglu_and_the_head_are_the_einsum_forms():
  x, wg, wu, wd = _draw(2, 6, 8), _draw(8, 12, seed=1), _draw(8, 12, seed=2), _draw(12, 8, seed=3)
  loss = lambda f: jax.grad(lambda *a: jnp.sum(f(*a) ** 2), argnums=(0, 1, 2, 3))
  np.testing.assert_allclose(
    layers.swiglu(x, wg, wu, wd), token_matmul._einsum_swiglu(x, wg, wu, wd), rtol=1e-5
  )
  for g, r in zip(
    loss(layers.swiglu)(x, wg, wu, wd), loss(token_matmul._einsum_swiglu)(x, wg, wu, wd)
  ):  # f32 sums in another order: differences relative to the gradient's own scale
    np.testing.assert_allclose(g, r, rtol=1e-5, atol=1e-6 * float(jnp.max(jnp.abs(r))))

  class Table:
    embedding = _draw(10, 8, seed=4)
    dtype = jnp.float32

  np.testing.assert_allclose(
    layers.Embedding.attend(Table(), x), token_matmul._einsum_attend(Table(), x), rtol=1e-5
  )


def test_the_benchmark_patches_the_einsums_back_and_restores_the_model():
  now = (layers.swiglu, attention.token_matmul, routing_layer.token_matmul, layers.Embedding.attend)
  with token_matmul.einsum_forms():
    assert layers.swiglu is token_matmul._einsum_swiglu
    assert attention.token_matmul is token_matmul._einsum_token_matmul
  assert now == (
    layers.swiglu,
    attention.token_matmul,
    routing_layer.token_matmul,
    layers.Embedding.attend,
  )
  result = token_matmul.swiglu_layer(step_roofline.SHAPES['smoke'], rounds=1)
  assert result['max_relative_gradient_difference'] < 1e-5
  assert all(t > 0 for t in result['median_ms'].values())
