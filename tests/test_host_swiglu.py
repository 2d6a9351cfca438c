"""model/host_blas.swiglu, the experts' SwiGLU fused in one host call each way ('blas'), against a
dense per-row reference: values and gradients with an empty group and rows past the groups, large
pre-activations (its own exp), and a NaN that stays in its row."""

import jax
import jax.numpy as jnp
import numpy as np

from model import host_blas

SIZES = (5, 0, 9, 3)  # 17 of the 20 rows: group 1 empty, three rows past the groups


def _problem(scale=0.3, m=20, d=8, f=12, sizes=SIZES):
  keys = jax.random.split(jax.random.PRNGKey(3), 4)
  g = len(sizes)
  x = jax.random.normal(keys[0], (m, d))
  ws = [
    jax.random.normal(k, s) * scale for k, s in zip(keys[1:], ((g, d, f), (g, d, f), (g, f, d)))
  ]
  return x, ws, jnp.array(sizes, jnp.int32)


def _reference(x_MD, wg, wu, wd, sizes_G):
  m, g = x_MD.shape[0], sizes_G.shape[0]
  group_M = jnp.repeat(jnp.arange(g), sizes_G, total_repeat_length=m)
  hot_MG = jax.nn.one_hot(group_M, g) * (jnp.arange(m) < sizes_G.sum())[:, None]
  pick = lambda w: jnp.einsum('mg,g...->m...', hot_MG, w)  # each row's own expert weights
  h_MF = jax.nn.silu(jnp.einsum('md,mdf->mf', x_MD, pick(wg))) * jnp.einsum(
    'md,mdf->mf', x_MD, pick(wu)
  )
  return jnp.einsum('mf,mfd->md', h_MF, pick(wd))


def _value_and_grads(fn, x, ws, sizes):
  """The output and the gradients of <y, r> for a fixed random cotangent r (a loss like sin(y)
  would amplify f32 rounding at |y| ~ 1e4 and test nothing about the kernel)."""
  r = jax.random.normal(jax.random.PRNGKey(4), x.shape)
  loss = lambda x, *ws: (lambda y: (jnp.sum(y * r), y))(fn(x, *ws, sizes))
  return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3), has_aux=True))(x, *ws)


def _close(actual, desired):
  """1e-5 relative to the array's scale (tests/test_gmm.py's tolerance)."""
  desired = np.asarray(desired)
  np.testing.assert_allclose(actual, desired, rtol=1e-5, atol=1e-5 * np.abs(desired).max())


def test_values_and_gradients_equal_the_reference():
  for scale in (0.3, 6.0):  # 6.0: pre-activations up to about ±100, where exp saturates
    x, ws, sizes = _problem(scale)
    (_, y), grads = _value_and_grads(host_blas.swiglu, x, ws, sizes)
    (_, y_ref), grads_ref = _value_and_grads(_reference, x, ws, sizes)
    assert float(jnp.abs(y).max()) > (1e3 if scale > 1 else 0.1)
    _close(y, y_ref)
    assert not np.asarray(y[sum(SIZES) :]).any()  # rows past the groups: zero
    for a, b in zip(grads, grads_ref):
      _close(a, b)
    assert not np.asarray(grads[2][1]).any()  # the empty group's weight gradient: zero


def test_a_group_split_over_several_tasks():
  """500 rows in one group: the kernel splits them into several row tasks (at least 64 rows, at
  most a quarter of each thread's share), whose weight gradients are still one per group."""
  x, ws, sizes = _problem(m=600, sizes=(500, 0, 60))
  (_, y), grads = _value_and_grads(host_blas.swiglu, x, ws, sizes)
  (_, y_ref), grads_ref = _value_and_grads(_reference, x, ws, sizes)
  _close(y, y_ref)
  for a, b in zip(grads, grads_ref):
    _close(a, b)


def test_a_nan_stays_in_its_row_and_its_group():
  x, ws, sizes = _problem()
  x = x.at[6, 2].set(jnp.nan)  # row 6: group 2
  (_, y), grads = _value_and_grads(host_blas.swiglu, x, ws, sizes)
  bad = np.isnan(np.asarray(y)).any(axis=1)
  assert bad[6] and bad.sum() == 1
  dw_gate = np.asarray(grads[1])
  assert np.isnan(dw_gate[2]).any() and not np.isnan(dw_gate[[0, 1, 3]]).any()
