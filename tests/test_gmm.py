"""model/gmm.py: the grouped-matmul kernel per platform, refusals in one line, and the kernels
that run on CPU against the every-expert reference in values and gradients."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import base, schema
from model import gmm, moe, router
from model.config import ConfigError


@pytest.mark.parametrize(
  'platform, hopper, tokamax, expected',
  [
    ('cpu', True, True, 'scan'),
    ('tpu', False, False, 'megablox'),
    ('gpu', True, True, 'mgpu'),
    ('gpu', False, True, 'tokamax'),
    ('gpu', False, False, 'scan'),  # never ragged_dot on GPU: XLA runs it densely
  ],
)
def test_auto_per_platform(monkeypatch, platform, hopper, tokamax, expected):
  monkeypatch.setattr(gmm, '_compute_capability', lambda: '9.0' if hopper else '8.0')
  monkeypatch.setattr(gmm, '_has_tokamax', lambda: tokamax)
  assert gmm.resolve('auto', platform) == expected
  assert gmm.resolve('auto', platform, dtype=jnp.bfloat16) == expected
  # The GPU kernels take f32 as tf32; on CPU f32 gets the host BLAS kernel (it builds here).
  f32 = {'tpu': 'megablox', 'cpu': 'blas'}.get(platform, 'scan')
  assert gmm.resolve('auto', platform, dtype=jnp.float32) == f32


def test_explicit_kernels_resolve_where_they_run(monkeypatch):
  monkeypatch.setattr(gmm, '_compute_capability', lambda: '9.0')
  monkeypatch.setattr(gmm, '_has_tokamax', lambda: True)
  for platform in ('cpu', 'gpu', 'tpu'):
    assert gmm.resolve('scan', platform) == 'scan'
    assert gmm.resolve('ragged_dot', platform) == 'ragged_dot'
  assert gmm.resolve('megablox', 'tpu') == 'megablox'
  assert gmm.resolve('megablox', 'cpu', interpret=True) == 'megablox'
  assert gmm.resolve('mgpu', 'gpu') == 'mgpu'
  assert gmm.resolve('tokamax', 'gpu') == 'tokamax'


@pytest.mark.parametrize(
  'impl, platform, message',
  [
    ('mgpu', 'cpu', "moe.gmm_impl='mgpu': needs a GPU backend (this process has cpu)"),
    ('mgpu', 'tpu', "moe.gmm_impl='mgpu': needs a GPU backend (this process has tpu)"),
    ('megablox', 'cpu', "moe.gmm_impl='megablox': needs a TPU backend (this process has cpu)"),
    ('megablox', 'gpu', "moe.gmm_impl='megablox': needs a TPU backend (this process has gpu)"),
    ('tokamax', 'cpu', "moe.gmm_impl='tokamax': needs a GPU backend (this process has cpu)"),
    ('blocked', 'cpu', "moe.gmm_impl='blocked': expected one of"),
  ],
)
def test_refusals_are_one_line(impl, platform, message):
  with pytest.raises(ConfigError) as err:
    gmm.resolve(impl, platform)
  assert str(err.value).startswith(message) and '\n' not in str(err.value)


def test_gpu_refusals_name_what_is_missing(monkeypatch):
  monkeypatch.setattr(gmm, '_compute_capability', lambda: '8.0')
  monkeypatch.setattr(gmm, '_has_tokamax', lambda: False)
  with pytest.raises(
    ConfigError, match=r'needs a Hopper GPU \(compute capability 9.x; this process has 8.0\)$'
  ):
    gmm.resolve('mgpu', 'gpu')
  with pytest.raises(
    ConfigError, match=r"^moe.gmm_impl='tokamax': needs the tokamax package \(Python >= 3.12"
  ):
    gmm.resolve('tokamax', 'gpu')


def test_config_load_refuses_a_kernel_that_cannot_run_here():
  cfg = base.get_config()
  cfg.moe.num_experts, cfg.moe.gmm_impl = 4, 'mgpu'
  with pytest.raises(ConfigError, match="^moe.gmm_impl='mgpu': needs a GPU backend"):
    schema.load(cfg, 1)
  cfg.moe.gmm_impl = 'no_such_kernel'
  with pytest.raises(ConfigError, match="^moe.gmm_impl='no_such_kernel': expected one of"):
    schema.load(cfg, 1)


@pytest.mark.parametrize(
  'old, new', [('blocked', 'scan'), ('ragged_dot', 'ragged_dot'), ('auto', 'auto')]
)
def test_old_config_json_reads_dropless_impl(old, new):
  tree = json.loads(json.dumps(base.get_config().to_dict()))
  del tree['moe']['gmm_impl']
  tree['moe']['dropless_impl'] = old
  assert schema.from_dict(tree).model.moe.gmm_impl == new


def _problem(t=7, e=4, k=2, d=16, f=32):  # 14 rows: megablox pads to its 16-row tile
  keys = jax.random.split(jax.random.PRNGKey(0), 5)
  x = jax.random.normal(keys[0], (t, d))
  logits = jax.random.normal(keys[1], (t, e)) * 2.0
  logits = logits.at[:, 1].add(-100.0)  # expert 1 gets no rows: an empty group
  ws = tuple(
    jax.random.normal(kk, shape) * 0.2
    for kk, shape in zip(keys[2:], ((e, d, f), (e, d, f), (e, f, d)))
  )
  return x, logits, ws


def _value_and_grads(fn, k, x, logits, ws):
  def loss(x, logits, *ws):
    weights, experts = router.topk_route(logits, k)
    y = fn(x, weights, experts, *ws)
    return jnp.sum(y * jnp.sin(y)), y

  return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3, 4), has_aux=True))(x, logits, *ws)


def _close(actual, desired):
  """1e-5 relative to the array's scale (tests/test_moe.py's tolerance)."""
  desired = np.asarray(desired)
  np.testing.assert_allclose(actual, desired, rtol=1e-5, atol=1e-5 * np.abs(desired).max())


@pytest.mark.parametrize('impl', ['scan', 'blas', 'ragged_dot', 'megablox'])
def test_kernels_equal_reference_values_and_gradients(impl):
  k = 2
  x, logits, ws = _problem(k=k)
  (_, y_ref), g_ref = _value_and_grads(moe.experts_reference, k, x, logits, ws)
  fn = lambda *a: moe.experts_dropless(*a, impl=impl, block_size=4, interpret=True)
  (_, y), g = _value_and_grads(fn, k, x, logits, ws)
  _close(y, y_ref)
  for a, b in zip(g, g_ref):
    _close(a, b)


def test_ragged_vjp_wiring_against_ragged_dot():
  """The custom VJP that joins the forward-only Hopper kernels, checked with XLA stand-ins."""
  sizes_G = jnp.array([3, 0, 6, 2], jnp.int32)
  x_MK = jax.random.normal(jax.random.PRNGKey(1), (11, 8))
  w_GKN = jax.random.normal(jax.random.PRNGKey(2), (4, 8, 5))
  group_M = jnp.repeat(jnp.arange(4), sizes_G, total_repeat_length=11)

  def tgmm(x_MK, dy_MN, sizes_G):
    return jnp.einsum('mk,mn,mg->gkn', x_MK, dy_MN, jax.nn.one_hot(group_M, 4))

  fwd = lambda x, w, s: jax.lax.ragged_dot(x, w, s)
  fwd_t = lambda dy, w, s: jax.lax.ragged_dot(dy, w.swapaxes(1, 2), s)
  mm = gmm.ragged_vjp(fwd, fwd_t, tgmm)
  loss = lambda f: lambda x, w: jnp.sum(jnp.sin(f(x, w, sizes_G)))
  g = jax.grad(loss(mm), (0, 1))(x_MK, w_GKN)
  g_ref = jax.grad(loss(jax.lax.ragged_dot), (0, 1))(x_MK, w_GKN)
  for a, b in zip(g, g_ref):
    _close(a, b)


def test_blas_refusals_are_one_line(monkeypatch):
  """'blas' runs on the CPU backend only, in float32 only; 'auto' picks it there where it builds,
  and the scan where it does not."""
  with pytest.raises(
    ConfigError, match=r"^moe.gmm_impl='blas': needs the CPU backend \(this process has gpu\)$"
  ):
    gmm.resolve('blas', 'gpu')
  with pytest.raises(
    ConfigError, match=r"^moe.gmm_impl='blas': needs float32 \(model.dtype\); got bfloat16$"
  ):
    gmm.resolve('blas', 'cpu', dtype=jnp.bfloat16)
  assert gmm.resolve('blas', 'cpu', dtype=jnp.float32) == 'blas'
  assert gmm.resolve('auto', 'cpu', dtype=jnp.float32) == 'blas'  # it builds here
  assert gmm.resolve('auto', 'cpu', dtype=jnp.bfloat16) == 'scan'
  monkeypatch.setattr(gmm.host_blas, '_register', lambda: "needs NumPy's bundled OpenBLAS")
  with pytest.raises(ConfigError, match=r"^moe.gmm_impl='blas': needs NumPy's bundled OpenBLAS$"):
    gmm.resolve('blas', 'cpu')
  assert gmm.resolve('auto', 'cpu', dtype=jnp.float32) == 'scan'
