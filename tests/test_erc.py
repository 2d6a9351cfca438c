"""ERC loss (docs/methods.md §2.4): Eq. 3 against NumPy, the Eq. 4 noise guarantee, gradients, alpha*."""

import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding

from configs import moe_erc, schema, sharding
from model import axes, erc
from model.config import ConfigError
from model.transformer import Transformer
from train import mesh as mesh_lib


def _problem(e=8, d=12, f=10, seed=0):
  k1, k2 = jax.random.split(jax.random.PRNGKey(seed))
  return jax.random.normal(k1, (d, e)), jax.random.normal(k2, (e, d, f)) * 0.3


def _numpy_eq3(router_DE, w_gate_EDF, alpha, delta_ED):
  r = np.asarray(delta_ED, np.float64) * np.asarray(router_DE, np.float64).T
  w = np.asarray(w_gate_EDF, np.float64)
  n = r.shape[0]
  m = np.array([[np.linalg.norm(r[i] @ w[j]) for j in range(n)] for i in range(n)])
  total = 0.0
  for i in range(n):
    for j in range(n):
      if j != i:
        total += max(m[i, j] - alpha * m[i, i], 0.0) + max(m[j, i] - alpha * m[i, i], 0.0)
  return total / n**2


@pytest.mark.parametrize('alpha', [0.0, 0.5, 1.0, 1.5])
def test_loss_matches_numpy_eq3(alpha):
  router_DE, w_gate_EDF = _problem()
  delta_ED = erc.erc_noise(jax.random.PRNGKey(3), router_DE)
  got = erc.erc_loss(router_DE, w_gate_EDF, alpha=alpha, delta_ED=delta_ED)
  assert got.dtype == jnp.float32 and got.shape == ()
  np.testing.assert_allclose(got, _numpy_eq3(router_DE, w_gate_EDF, alpha, delta_ED), rtol=1e-5)
  clean = erc.erc_loss(router_DE, w_gate_EDF, alpha=alpha)  # delta None = no noise
  np.testing.assert_allclose(
    clean, _numpy_eq3(router_DE, w_gate_EDF, alpha, np.ones((8, 12))), rtol=1e-5
  )


def test_large_alpha_gives_exactly_zero():
  router_DE, w_gate_EDF = _problem(seed=1)
  delta_ED = erc.erc_noise(jax.random.PRNGKey(0), router_DE)
  assert float(erc.erc_loss(router_DE, w_gate_EDF, alpha=1e3, delta_ED=delta_ED)) == 0.0


def test_hand_built_case():
  # Orthogonal rows R_0 = e_0, R_1 = e_1; diagonal (block-diagonal) gates W_g^0 = diag(2, 1),
  # W_g^1 = diag(1, 3): M = [[2, 1], [1, 3]].
  router_DE = jnp.eye(2)
  w_gate_EDF = jnp.stack([jnp.diag(jnp.array([2.0, 1.0])), jnp.diag(jnp.array([1.0, 3.0]))])
  np.testing.assert_allclose(erc.activations(router_DE, w_gate_EDF), [[2, 1], [1, 3]])
  # alpha = 0.4: row terms relu(1 - 0.8) + relu(1 - 1.2), column terms relu(1 - 1.2) +
  # relu(1 - 0.8): 0.4 over n² = 4 entries.
  np.testing.assert_allclose(erc.erc_loss(router_DE, w_gate_EDF, alpha=0.4), 0.1, rtol=1e-6)
  assert float(erc.erc_loss(router_DE, w_gate_EDF, alpha=1.0)) == 0.0
  np.testing.assert_allclose(erc.coupling_level(router_DE, w_gate_EDF), 0.5, rtol=1e-6)
  # Nearest row of either is at distance sqrt(2), each has norm 1: eps = sqrt(2) / 2.
  np.testing.assert_allclose(erc.epsilon(router_DE), [2**-0.5] * 2, rtol=1e-6)


@pytest.mark.parametrize('spread', [1.0, 0.05])
def test_noisy_rows_stay_closest_to_their_own_row(spread):
  # spread 0.05: rows are near copies of one direction, so eps is small and the bound is tight.
  k1, k2 = jax.random.split(jax.random.PRNGKey(7))
  base = jax.random.normal(k1, (16, 1))
  router_DE = base + spread * jax.random.normal(k2, (16, 12))
  r_ED = np.asarray(router_DE).T
  eps_E = np.asarray(erc.epsilon(router_DE))
  deltas = jax.vmap(erc.erc_noise, in_axes=(0, None))(
    jax.random.split(jax.random.PRNGKey(0), 500), router_DE
  )
  assert np.all(np.abs(np.asarray(deltas) - 1) <= eps_E[None, :, None] + 1e-6)
  noisy = np.asarray(deltas) * r_ED[None]  # [draws, E, D]
  dist = np.linalg.norm(noisy[:, :, None, :] - r_ED[None, None, :, :], axis=-1)  # [draws, i, j]
  own = np.diagonal(dist, axis1=1, axis2=2)
  other = np.where(np.eye(12, dtype=bool)[None], np.inf, dist).min(-1)
  assert np.all(own < other)
  # And close to the bound: the farthest draw uses most of the allowed eps_i ||R_i||.
  assert np.all(own.max(0) > 0.5 * eps_E * np.linalg.norm(r_ED, axis=-1) / np.sqrt(3))


@pytest.mark.parametrize('grad_to_router', [False, True])
def test_gradient_paths(grad_to_router):
  router_DE, w_gate_EDF = _problem(seed=2)
  delta_ED = erc.erc_noise(jax.random.PRNGKey(1), router_DE)
  loss = lambda r, w: erc.erc_loss(
    r, w, alpha=0.5, delta_ED=delta_ED, grad_to_router=grad_to_router
  )
  assert float(loss(router_DE, w_gate_EDF)) > 0
  g_r, g_w = jax.grad(loss, argnums=(0, 1))(router_DE, w_gate_EDF)
  assert float(jnp.abs(g_w).max()) > 0
  assert (float(jnp.abs(g_r).max()) > 0) == grad_to_router
  assert np.all(np.isfinite(g_r)) and np.all(np.isfinite(g_w))


def test_gradient_is_finite_when_activations_vanish():
  router_DE = jnp.eye(2)
  w_gate_EDF = jnp.stack([jnp.diag(jnp.array([2.0, 0.0])), jnp.diag(jnp.array([0.0, 3.0]))])
  g = jax.grad(lambda r, w: erc.erc_loss(r, w, alpha=0.0, grad_to_router=True), argnums=(0, 1))(
    router_DE, w_gate_EDF
  )  # off-diagonal M entries are exactly 0
  assert all(np.all(np.isfinite(x)) for x in g)


@pytest.mark.parametrize('seed', [0, 1, 2])
def test_coupling_level_is_where_the_loss_turns_zero(seed):
  router_DE, w_gate_EDF = _problem(seed=seed)
  a = float(erc.coupling_level(router_DE, w_gate_EDF))
  assert a > 0
  assert float(erc.erc_loss(router_DE, w_gate_EDF, alpha=a * (1 + 1e-6))) == 0.0
  assert float(erc.erc_loss(router_DE, w_gate_EDF, alpha=a * (1 - 1e-3))) > 0.0


def _tiny_erc(**moe_fields):
  c = moe_erc.get_config('tiny')
  c.moe.update(**moe_fields)
  return schema.load(c, 1)


@pytest.mark.parametrize(
  'moe_fields',
  [{}, {'execution': 'capacity', 'shared_experts': 1}],
  ids=['dropless', 'capacity_shared_experts'],
)
def test_moe_layer_adds_erc_loss_and_reports_metrics(moe_fields):
  cfg = _tiny_erc(**moe_fields).model
  model = Transformer(cfg, rngs=nnx.Rngs(0))
  tokens = jax.random.randint(jax.random.PRNGKey(0), (2, 16), 0, cfg.vocab_size)
  _, aux = model(tokens)
  metrics, m = aux['metrics'], cfg.moe
  layers = [i for i in range(cfg.num_layers) if m.is_moe_layer(i)]
  assert layers
  expected = 0.0
  for i in layers:
    p = f'layer_{i}/moe/'
    for name in ('erc_loss', 'erc_epsilon', 'coupling_level'):
      assert jnp.ndim(metrics[p + name]) == 0 and float(metrics[p + name]) > 0
    expected += (
      m.balance_weight * metrics[p + 'balance_loss']
      + m.z_loss_weight * metrics[p + 'z_loss']
      + m.erc_weight * metrics[p + 'erc_loss'] / len(layers)
    )
  np.testing.assert_allclose(aux['loss'], expected, rtol=1e-5)
  # update_state draws a fresh noise key; the clean-row alpha* does not depend on it.
  model.update_state(aux['stats'])
  _, aux2 = model(tokens)
  for i in layers:
    p = f'layer_{i}/moe/'
    assert float(aux2['metrics'][p + 'erc_loss']) != float(metrics[p + 'erc_loss'])
    np.testing.assert_allclose(aux2['metrics'][p + 'coupling_level'], metrics[p + 'coupling_level'])


def test_no_erc_cost_without_erc():
  """With ERC off the layer computes neither the loss nor alpha* (E^2·D·F per step)."""
  cfg = _tiny_erc(erc_weight=0.0).model
  _, aux = Transformer(cfg, rngs=nnx.Rngs(0))(jnp.zeros((1, 8), jnp.int32))
  assert not any('erc' in k or 'coupling' in k for k in aux['metrics'])


@pytest.mark.parametrize(
  'fields, field',
  [
    ({'erc_alpha': -0.5}, 'moe.erc_alpha'),
    ({'erc_weight': -1.0}, 'moe.erc_weight'),
    ({'num_experts': 0}, 'moe.erc_weight'),
    ({'every': 8}, 'moe.erc_weight'),
  ],
)
def test_validation_names_the_field(fields, field):
  with pytest.raises(ConfigError, match=re.escape(field)) as info:
    _tiny_erc(**fields)
  assert '\n' not in str(info.value)


_COLLECTIVE = re.compile(
  r'= (\w+)\[([\d,]*)\][^=]* (all-gather|all-reduce|reduce-scatter|all-to-all|'
  r'collective-permute)(-start)?\('
)


@pytest.mark.parametrize(
  'shape, rules',
  [((1, 1, 1, 8), 'fsdp_ep'), ((1, 2, 1, 4), 'fsdp_ep')],
  ids=['expert8', 'fsdp2_expert4'],
)
def test_expert_sharded_loss_equals_unsharded_and_never_moves_expert_weights(shape, rules):
  """Loss and gradients (router and W_g) on an expert-sharded mesh equal the unsharded ones, and
  XLA's collectives stay far below one expert shard of W_g: the loss is computed where the experts
  live (M[:, local experts]), exchanging E-sized vectors; with FSDP also the partial sums over the
  sharded embedding (E × E/ep × F), never the weights."""
  e, d, f = 16, 64, 32
  router_DE, w_gate_EDF = _problem(e, d, f, seed=3)
  delta_ED = erc.erc_noise(jax.random.PRNGKey(4), router_DE)
  fn = jax.value_and_grad(
    lambda r, w: erc.erc_loss(r, w, alpha=0.8, delta_ED=delta_ED, grad_to_router=True),
    argnums=(0, 1),
  )
  ref_loss, ref_grads = jax.jit(fn)(router_DE, w_gate_EDF)
  assert float(ref_loss) > 0

  mesh = mesh_lib.make_mesh(schema.MeshConfig(shape=shape, rules=rules))
  preset = sharding.rules(rules)
  spec = lambda names: NamedSharding(mesh, axes.logical_to_spec(names, preset, mesh))
  r_sharding, w_sharding = spec(('embed', None)), spec(('expert', 'embed', 'mlp'))
  args = (jax.device_put(router_DE, r_sharding), jax.device_put(w_gate_EDF, w_sharding))
  compiled = jax.jit(fn, out_shardings=(spec(()), (r_sharding, w_sharding))).lower(*args).compile()
  loss, grads = compiled(*args)
  assert 'expert' in str(grads[1].sharding.spec)
  np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
  for got, want in zip(grads, ref_grads):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)

  sizes = [
    math.prod(int(n) for n in dims.split(',') if n)
    for _, dims, _, _ in _COLLECTIVE.findall(compiled.as_text())
  ]
  assert sizes, 'expected some communication on a sharded mesh'
  expert_shard = e // mesh.shape['expert'] * d * f
  assert max(sizes) <= e * (e // mesh.shape['expert']) * f < expert_shard, sizes
