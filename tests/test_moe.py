"""Routers and expert execution against hand-built cases and the every-expert reference."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs import moe_topk, schema
from model import capacity, layers, moe, router
from model.moe_layer import MoE


def test_topk_route_selects_and_weighs():
  logits = jnp.array([[3.0, 1.0, 2.0, 0.0], [0.0, 5.0, 1.0, 4.0]])
  weights, experts = router.topk_route(logits, 2)
  np.testing.assert_array_equal(experts, [[0, 2], [1, 3]])
  e = np.exp
  np.testing.assert_allclose(
    weights,
    [[e(3) / (e(3) + e(2)), e(2) / (e(3) + e(2))], [e(5) / (e(5) + e(4)), e(4) / (e(5) + e(4))]],
    rtol=1e-6,
  )
  raw, _ = router.topk_route(logits, 2, renormalize=False)
  np.testing.assert_allclose(
    raw, jnp.take_along_axis(jax.nn.softmax(logits), experts, 1), rtol=1e-6
  )
  sig, sig_experts = router.topk_route(logits, 1, score='sigmoid', renormalize=False)
  np.testing.assert_array_equal(sig_experts, [[0], [1]])
  np.testing.assert_allclose(sig, jax.nn.sigmoid(jnp.array([[3.0], [5.0]])), rtol=1e-6)


def test_bias_changes_selection_not_weights():
  logits = jnp.array([[3.0, 1.0, 2.0, 0.0]])
  bias = jnp.array([0.0, 0.0, 0.0, 10.0])
  for score in ('softmax', 'sigmoid'):
    weights, experts = router.topk_route(logits, 2, score=score, bias_E=bias, renormalize=False)
    np.testing.assert_array_equal(experts, [[3, 0]])  # the bias pulls expert 3 in
    s = router.scores(logits, score)
    np.testing.assert_allclose(weights, s[:, [3, 0]], rtol=1e-6)  # weights are the raw scores


def test_bias_update_rule():
  load = jnp.array([4.0, 0.0, 2.0, 2.0])  # mean 2: expert 0 over-, expert 1 under-loaded
  bias = jnp.array([0.5, 0.5, 0.5, 0.5])
  np.testing.assert_allclose(router.update_bias(bias, load, 1e-3), [0.499, 0.501, 0.5, 0.5])


def test_losses_on_a_hand_built_case():
  logits = jnp.log(jnp.array([[0.5, 0.5], [0.5, 0.5]]))
  out = router.route_topk(logits, 1)
  # f = (1, 0) (ties pick expert 0), P = (0.5, 0.5): E * sum f P = 2 * 0.5 = 1
  np.testing.assert_allclose(out.balance_loss, 1.0, rtol=1e-6)
  np.testing.assert_allclose(out.z_loss, 0.0, atol=1e-6)  # logsumexp of log-probs is 0
  np.testing.assert_allclose(out.entropy, np.log(2.0), rtol=1e-6)
  np.testing.assert_array_equal(out.load_E, [2.0, 0.0])


def test_balance_conventions_and_invalid_tokens_on_a_hand_built_case():
  """f per assignment (sums to 1) vs per token (sums to k, Hugging Face's Mixtral/OLMoE value):
  k times apart; an invalid token changes no loss and no count."""
  probs = jnp.array([[0.4, 0.3, 0.2, 0.1], [0.1, 0.2, 0.3, 0.4], [0.7, 0.1, 0.1, 0.1]])
  logits = jnp.log(probs)
  experts = jnp.array([[0, 1], [3, 2], [0, 1]])
  # f = (2, 2, 1, 1) / 6 per assignment; P = (1.2, 0.6, 0.6, 0.6) / 3; E * sum f P = 4 * 4.8 / 18
  np.testing.assert_allclose(router.balance_loss(probs, experts), 4 * 4.8 / 18, rtol=1e-6)
  np.testing.assert_allclose(
    router.balance_loss(probs, experts, convention='tokens'), 2 * 4 * 4.8 / 18, rtol=1e-6
  )
  valid = jnp.array([True, True, False])
  out = router.route_topk(logits, 2, valid_T=valid)
  alone = router.route_topk(logits[:2], 2)
  for name in ('load_E', 'balance_loss', 'z_loss', 'entropy'):
    np.testing.assert_allclose(getattr(out, name), getattr(alone, name), rtol=1e-6, err_msg=name)
  with pytest.raises(ValueError, match="balance convention 'hf'"):
    router.balance_loss(probs, experts, convention='hf')


def _close(actual, desired):
  """Equal to 1e-5 relative to the array's scale: gradients are sums over tokens in a different
  order, so an element that cancels to near zero carries rounding of the size of its terms."""
  desired = np.asarray(desired)
  np.testing.assert_allclose(actual, desired, rtol=1e-5, atol=1e-5 * np.abs(desired).max())


def _problem(t, e, k, d=16, f=24, seed=0):
  keys = jax.random.split(jax.random.PRNGKey(seed), 5)
  x = jax.random.normal(keys[0], (t, d))
  logits = jax.random.normal(keys[1], (t, e)) * 2.0
  ws = (
    jax.random.normal(keys[2], (e, d, f)) * 0.2,
    jax.random.normal(keys[3], (e, d, f)) * 0.2,
    jax.random.normal(keys[4], (e, f, d)) * 0.2,
  )
  return x, logits, ws


def _value_and_grads(fn, k, x, logits, ws):
  def loss(x, logits, *ws):
    # k=1 renormalised gives weight 1 and a router gradient that is exactly 0 (rounding noise).
    weights, experts = router.topk_route(logits, k, renormalize=k > 1)
    y = fn(x, weights, experts, *ws)
    return jnp.sum(y * jnp.sin(y)), y

  return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3, 4), has_aux=True))(x, logits, *ws)


@pytest.mark.parametrize('impl', ['scan', 'ragged_dot'])
@pytest.mark.parametrize('t, e, k', [(7, 4, 2), (33, 8, 3), (64, 8, 1), (5, 16, 2)])
def test_dropless_equals_reference(impl, t, e, k):
  x, logits, ws = _problem(t, e, k)
  if t == 5:
    assert len(set(np.asarray(router.topk_route(logits, k)[1]).ravel())) < e  # empty experts
  (_, y_ref), g_ref = _value_and_grads(moe.experts_reference, k, x, logits, ws)
  (_, y), g = _value_and_grads(
    lambda *a: moe.experts_dropless(*a, impl=impl, block_size=4), k, x, logits, ws
  )
  _close(y, y_ref)
  for a, b in zip(g, g_ref):
    _close(a, b)


def test_block_rows_auto_rule_and_auto_blocks_equal_reference():
  """0 picks 256 rows per block, or 128 where the mean rows per expert are under 512; the blocked
  kernel with the picked rows (128, most of them padding) equals the reference."""
  assert moe.block_rows(8192, 8, 0) == 256  # the demo shape: 1024 rows per expert
  assert moe.block_rows(4096, 8, 0) == 256  # 512 rows per expert
  assert moe.block_rows(4088, 8, 0) == 128  # 511
  assert moe.block_rows(16384, 8, 0) == 256 and moe.block_rows(10**6, 8, 0) == 256
  assert moe.block_rows(64, 8, 0) == 128
  assert moe.block_rows(8192, 8, 64) == 64  # an explicit size is kept
  x, logits, ws = _problem(40, 4, 2)
  (_, y_ref), g_ref = _value_and_grads(moe.experts_reference, 2, x, logits, ws)
  (_, y), g = _value_and_grads(lambda *a: moe.experts_dropless(*a, impl='scan'), 2, x, logits, ws)
  _close(y, y_ref)
  for a, b in zip(g, g_ref):
    _close(a, b)


@pytest.mark.parametrize('groups', [1, 2])
def test_capacity_equals_reference_when_nothing_drops(groups):
  t, e, k = 32, 4, 2
  x, logits, ws = _problem(t, e, k, seed=1)
  (_, y_ref), g_ref = _value_and_grads(moe.experts_reference, k, x, logits, ws)
  fn = lambda *a: moe.experts_capacity(*a, capacity_factor=e / k, num_groups=groups)[0]
  (_, y), g = _value_and_grads(fn, k, x, logits, ws)
  _close(y, y_ref)
  for a, b in zip(g, g_ref):
    _close(a, b)
  weights, experts = router.topk_route(logits, k)
  assert float(moe.experts_capacity(x, weights, experts, *ws, e / k)[1]) == 0.0


def test_capacity_dropped_fraction_is_exact():
  x, _, ws = _problem(4, 2, 2, seed=2)
  experts = jnp.array([[0, 1], [0, 1], [0, 1], [1, 0]])
  weights = jnp.full((4, 2), 0.5)
  # C = ceil(0.5 * 4 * 2 / 2) = 2. First choices: expert 0 gets tokens 0, 1 (token 2 dropped),
  # expert 1 gets token 3; second choices: expert 1 has one slot left (token 0), expert 0 none.
  y, dropped = moe.experts_capacity(x, weights, experts, *ws, 0.5)
  assert float(dropped) == 0.5
  keep = jnp.array([[1.0, 1.0], [1.0, 0.0], [0.0, 0.0], [1.0, 0.0]])
  np.testing.assert_allclose(
    y, moe.experts_reference(x, weights * keep, experts, *ws), rtol=1e-5, atol=1e-6
  )


def test_single_expert_equals_dense_swiglu():
  x, _, (wg, wu, wd) = _problem(24, 1, 1, seed=3)
  dense = layers.swiglu(x[None], wg[0], wu[0], wd[0])[0]
  weights, experts = jnp.ones((24, 1)), jnp.zeros((24, 1), jnp.int32)
  for impl in ('scan', 'ragged_dot'):
    y = moe.experts_dropless(x, weights, experts, wg, wu, wd, impl=impl, block_size=8)
    np.testing.assert_allclose(y, dense, rtol=1e-5, atol=1e-6)
  y, dropped = moe.experts_capacity(x, weights, experts, wg, wu, wd, 1.0)
  np.testing.assert_allclose(y, dense, rtol=1e-5, atol=1e-6)
  assert float(dropped) == 0.0


def test_expert_choice_routes_and_executes():
  x, logits, ws = _problem(16, 4, 1, seed=4)
  c = capacity.capacity(16, 1, 4, 2.0)
  assert c == 8
  out = router.route_expert_choice(logits, c)
  probs = jax.nn.softmax(logits)
  picked = np.zeros((4, 16))
  for i in range(4):
    top = np.argsort(-np.asarray(probs[:, i]))[:c]
    np.testing.assert_array_equal(np.sort(out.indices[i]), np.sort(top))
    picked[i, top] = probs[top, i]
  np.testing.assert_allclose(out.dropped_fraction, np.mean(picked.sum(0) == 0), rtol=1e-6)
  y = moe.experts_choice(x, out.weights, out.indices, *ws)
  y_all = moe._swiglu_E(jnp.broadcast_to(x, (4, 16, 16)), *ws)  # every expert on every token
  np.testing.assert_allclose(y, jnp.einsum('etd,et->td', y_all, picked), rtol=1e-5, atol=1e-6)


def _layer(**moe_fields):
  cfg = schema.load(moe_topk.get_config('tiny'), 1).model
  cfg = dataclasses.replace(cfg, moe=dataclasses.replace(cfg.moe, **moe_fields))
  return MoE(cfg, rngs=nnx.Rngs(0)), cfg


@pytest.mark.parametrize(
  'fields',
  [
    {},
    {'execution': 'capacity'},
    {'router': 'expert_choice'},
    {'score': 'sigmoid', 'bias_rate': 1e-3, 'shared_experts': 1},
  ],
)
def test_router_receives_gradient_and_metrics_are_scalars(fields):
  layer, cfg = _layer(**fields)
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 16, cfg.d_model))

  def loss(layer):
    y, aux = layer(x)
    return jnp.sum(y**2) + aux['loss'], aux

  grads, aux = nnx.jit(nnx.grad(loss, has_aux=True))(layer)
  assert float(jnp.abs(grads.router[...]).max()) > 0
  assert float(jnp.abs(grads.w_gate[...]).max()) > 0
  assert all(jnp.ndim(v) == 0 for v in aux['metrics'].values())
  assert aux['stats']['expert_counts'].shape == (cfg.moe.num_experts,)
  k = 1 if fields.get('router') == 'expert_choice' else cfg.moe.top_k
  assert float(aux['stats']['expert_counts'].sum()) == pytest.approx(
    32 * k if k > 1 else cfg.moe.num_experts * capacity.capacity(16, 1, 8, 1.25) * 2
  )
  if 'bias_rate' in fields:
    layer.update_state(aux['stats'])
    counts = np.asarray(aux['stats']['expert_counts'])
    np.testing.assert_allclose(layer.bias[...], 1e-3 * np.sign(counts.mean() - counts))
