"""Union of Experts pure functions: the equivalent decomposition, selection, causality, gate gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from model import capacity, layers, smha, uoe
from model.attention import causal_attention

B, L, D, H, G, K, F, E = 2, 12, 16, 4, 2, 8, 32, 4


def _close(actual, desired):
  """Equal to 1e-5 relative to the array's scale (as tests/test_moe.py: gradients are sums in a
  different order, so an element that cancels to near zero carries rounding of its terms' size)."""
  desired = np.asarray(desired)
  np.testing.assert_allclose(actual, desired, rtol=1e-5, atol=1e-5 * np.abs(desired).max())


def _normal(rng, shape, scale=1.0):
  return jnp.asarray(scale * rng.standard_normal(shape), jnp.float32)


def _attn_problem(seed=0):
  """numpy draws: jax.random inside a jitted test function costs seconds of compilation."""
  rng = np.random.default_rng(seed)
  x = _normal(rng, (B, L, D))
  ws = (
    _normal(rng, (D, H, K), 0.3),
    _normal(rng, (D, G, K), 0.3),
    _normal(rng, (D, G, K), 0.3),
    _normal(rng, (H, K, D), 0.3),
  )
  return x, ws, _normal(rng, (D, H))


def _mlp_problem(seed=1):
  rng = np.random.default_rng(seed)
  x = _normal(rng, (B, L, D))
  ws = (_normal(rng, (D, F), 0.2), _normal(rng, (D, F), 0.2), _normal(rng, (F, D), 0.2))
  return x, ws, _normal(rng, (D, E))


POSITIONS = jnp.broadcast_to(jnp.arange(L, dtype=jnp.int32), (B, L))


def _dense_attention(x, wq, wk, wv, wo, segment_ids=None):
  q = layers.apply_rope(jnp.einsum('bld,dhk->blhk', x, wq), POSITIONS, 1e4)
  k = layers.apply_rope(jnp.einsum('bld,dgk->blgk', x, wk), POSITIONS, 1e4)
  v = jnp.einsum('bld,dgk->blgk', x, wv)
  return jnp.einsum('blhk,hkd->bld', causal_attention(q, k, v, segment_ids_BL=segment_ids), wo)


def _value_and_grads(fn, *args):
  loss = lambda *a: (lambda y: (jnp.sum(y * jnp.sin(y)), y))(fn(*a))
  return jax.jit(jax.value_and_grad(loss, argnums=tuple(range(len(args))), has_aux=True))(*args)


def test_mlp_decomposition_is_column_and_row_blocks_and_round_trips():
  rng = np.random.default_rng(0)  # numpy in, numpy out: reshapes only, nothing to compile
  wg, wu, wd = rng.normal(size=(D, F)), rng.normal(size=(D, F)), rng.normal(size=(F, D))
  eg, eu, ed = uoe.mlp_to_experts(wg, wu, wd, E)
  assert eg.shape == (E, D, F // E) and ed.shape == (E, F // E, D)
  f = F // E
  np.testing.assert_array_equal(eg[2], wg[:, 2 * f : 3 * f])
  np.testing.assert_array_equal(eu[1], wu[:, f : 2 * f])
  np.testing.assert_array_equal(ed[3], wd[3 * f :])
  for a, b in zip(uoe.experts_to_mlp(eg, eu, ed), (wg, wu, wd)):
    np.testing.assert_array_equal(a, b)
  with pytest.raises(ValueError, match='num_experts=3 must divide the MLP width 32'):
    uoe.mlp_to_experts(wg, wu, wd, 3)


def test_smha_with_every_head_and_full_capacity_equals_dense_attention():
  """GQA (H=4, G=2) with three packed segments per row; without segments it is the same path
  minus the segment mask (covered by the converted model in test_uoe_model.py)."""
  x, ws, router = _attn_problem()
  seg = jnp.asarray(np.repeat([[1, 2, 3]], B, 0).repeat(L // 3, 1))

  def ours(x, router, *ws):
    return smha.smha(
      x,
      router,
      *ws,
      POSITIONS,
      heads_per_token=H,
      capacity_factor=1.0,
      gate_outputs=False,
      rope_theta=1e4,
      segment_ids_BL=seg,
    )[0]

  (_, y), grads = _value_and_grads(ours, x, router, *ws)
  (_, y_ref), grads_ref = _value_and_grads(lambda x, *ws: _dense_attention(x, *ws, seg), x, *ws)
  _close(y, y_ref)
  for a, b in zip((grads[0], *grads[2:]), grads_ref):  # x, wq, wk, wv, wo
    _close(a, b)
  np.testing.assert_array_equal(grads[1], 0.0)  # released code: the gate gets no gradient


@pytest.mark.parametrize('paradigm', ['data_selection', 'expert_selection'])
def test_uome_with_every_expert_and_full_capacity_equals_dense_mlp(paradigm):
  x, (wg, wu, wd), router = _mlp_problem()

  def ours(x, router, wg, wu, wd):
    experts = uoe.mlp_to_experts(wg, wu, wd, E)
    if paradigm == 'data_selection':
      return uoe.uome(x, router, *experts, k=E, capacity_factor=1.0, gate_outputs=False)[0]
    return uoe.uome_expert_selection(x, router, *experts, k=E, gate_outputs=False, block_size=8)[0]

  (_, y), grads = _value_and_grads(ours, x, router, wg, wu, wd)
  (_, y_ref), grads_ref = _value_and_grads(layers.swiglu, x, wg, wu, wd)
  _close(y, y_ref)
  for a, b in zip((grads[0], *grads[2:]), grads_ref):
    _close(a, b)
  np.testing.assert_array_equal(grads[1], 0.0)


def _router_grads(kind):
  """Gate gradients with and without gate_outputs (one compiled program), k = 2 of 4."""
  if kind == 'smha':
    x, ws, router = _attn_problem()
    fn = lambda r, gate_outputs: smha.smha(
      x, r, *ws, POSITIONS, heads_per_token=2, gate_outputs=gate_outputs
    )[0]
  else:
    x, (wg, wu, wd), router = _mlp_problem()
    experts = uoe.mlp_to_experts(wg, wu, wd, E)
    if kind == 'uome_ds':
      fn = lambda r, gate_outputs: uoe.uome(x, r, *experts, k=2, gate_outputs=gate_outputs)[0]
    else:
      fn = lambda r, gate_outputs: uoe.uome_expert_selection(
        x, r, *experts, k=2, gate_outputs=gate_outputs, block_size=8
      )[0]
  grad = lambda gate_outputs: jax.grad(lambda r: jnp.sum(jnp.sin(fn(r, gate_outputs))))(router)
  return jax.jit(lambda: (grad(True), grad(False)))()


@pytest.mark.parametrize('kind', ['smha', 'uome_ds', 'uome_es'])
def test_gate_learns_with_gate_outputs_and_gets_no_gradient_without(kind):
  with_outputs, released = _router_grads(kind)
  assert float(jnp.abs(with_outputs).max()) > 1e-3
  np.testing.assert_array_equal(released, 0.0)


def test_select_tokens_hand_built():
  # One sequence of 5 tokens, 2 experts, k = 1: tokens 0, 2, 3 choose expert 0, tokens 1, 4 expert 1.
  probs = jnp.array([[[0.9, 0.1], [0.2, 0.8], [0.6, 0.4], [0.7, 0.3], [0.4, 0.6]]])
  g = uoe.Gate(jnp.log(probs), probs, jnp.argmax(probs, -1)[..., None].astype(jnp.int32))
  select = jax.jit(uoe.select_tokens, static_argnums=1, static_argnames='gate_outputs')
  metrics_of = jax.jit(uoe.selection_metrics)
  sel = select(g, 2, gate_outputs=True)
  # Expert 0 keeps its top-2 of {0: .9, 2: .6, 3: .7} = tokens 0 and 3, in time order; expert 1
  # has exactly its two tokens 1 and 4.
  np.testing.assert_array_equal(sel.idx, [[[0, 3], [1, 4]]])
  np.testing.assert_array_equal(sel.valid, True)
  np.testing.assert_allclose(sel.weight, [[[1.8, 1.4], [1.6, 1.2]]], rtol=1e-6)  # E * gate
  sel = select(g, 4, gate_outputs=False)  # more slots than choosers: padding slots
  np.testing.assert_array_equal(sel.valid.sum(-1), [[3, 2]])
  np.testing.assert_array_equal(sel.weight, sel.valid.astype(jnp.float32))
  metrics = metrics_of(g, sel)
  np.testing.assert_allclose(metrics['unselected_fraction'], 0.0)
  np.testing.assert_allclose(metrics['dropped_fraction'], 0.0)
  metrics = metrics_of(g, select(g, 2))
  np.testing.assert_allclose(metrics['unselected_fraction'], 0.2)  # token 2 lost its only expert
  np.testing.assert_allclose(metrics['dropped_fraction'], 0.2)
  np.testing.assert_allclose(metrics['load_max'], 0.4)
  assert capacity.capacity(64, 2, 4, 1.0) == 32 and capacity.capacity(10, 1, 4, 1.0) == 3
  assert capacity.capacity(8, 4, 4, 2.0) == 8  # never more than the sequence


def test_a_token_no_head_selects_gets_only_its_residual():
  x, ws, router = _attn_problem()

  @jax.jit
  def run(x):
    y, g, sel = smha.smha(x, router, *ws, POSITIONS, heads_per_token=1, capacity_factor=0.5)
    counts = uoe.scatter_tokens(sel.valid.astype(jnp.int32), sel.idx, L)
    return y, counts, uoe.selection_metrics(g, sel)['unselected_fraction']

  y, counts, unselected_fraction = run(x)
  unselected = np.asarray(counts == 0)
  assert unselected.any() and not unselected.all()
  np.testing.assert_array_equal(np.asarray(y)[unselected], 0.0)
  assert np.all(np.abs(np.asarray(y)[~unselected]).max(-1) > 0)
  np.testing.assert_allclose(unselected_fraction, unselected.mean(), rtol=1e-6)


@pytest.mark.parametrize('kind', ['smha', 'uome_ds'])
def test_causal_under_fixed_selection(kind):
  """Outputs with the selection computed once from the unperturbed input, then held fixed."""
  if kind == 'smha':
    x, ws, router = _attn_problem()
    sel = jax.jit(lambda x: smha.smha(x, router, *ws, POSITIONS, heads_per_token=2)[2])(x)
    fn = jax.jit(lambda x: smha.smha_selected(x, *ws, POSITIONS, sel))
  else:
    x, (wg, wu, wd), router = _mlp_problem()
    experts = uoe.mlp_to_experts(wg, wu, wd, E)
    sel = jax.jit(lambda x: uoe.uome(x, router, *experts, k=2)[2])(x)
    fn = jax.jit(lambda x: uoe.uome_selected(x, *experts, sel))
  assert not np.asarray(sel.valid).all()  # a real selection with padding slots
  y = fn(x)
  for t in (0, 4, L - 2):
    y2 = fn(x.at[:, t + 1].add(5.0))
    np.testing.assert_array_equal(y2[:, : t + 1], y[:, : t + 1])


def test_expert_selection_is_causal_with_its_learned_gate():
  x, (wg, wu, wd), router = _mlp_problem()
  experts = uoe.mlp_to_experts(wg, wu, wd, E)
  fn = jax.jit(lambda x: uoe.uome_expert_selection(x, router, *experts, k=2, block_size=8)[0])
  np.testing.assert_allclose(uoe.prefix_mean(x)[:, 3], x[:, :4].mean(1), rtol=1e-6)
  y = fn(x)
  for t in (0, 5, L - 2):
    y2 = fn(x.at[:, t + 1 :].multiply(-3.0))
    np.testing.assert_allclose(y2[:, : t + 1], y[:, : t + 1], rtol=1e-6, atol=1e-7)


def test_learned_data_selection_reads_the_future():
  """Documented property (like expert choice): with the learned top-capacity selection, a later
  token can push an earlier one out of a head's capacity, so outputs at <= t change."""
  x, ws, router = _attn_problem()
  fn = jax.jit(lambda x: smha.smha(x, router, *ws, POSITIONS, heads_per_token=2)[0])
  y = fn(x)
  leaks = 0
  for t in range(L - 1):
    y2 = fn(x.at[:, t + 1].set(x[:, t + 1] * 4.0))
    leaks += int(not np.allclose(y2[:, : t + 1], y[:, : t + 1]))
  assert leaks > 0
