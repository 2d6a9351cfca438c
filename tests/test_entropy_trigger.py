"""Entropy-triggered routing (docs/methods.md §4): entropies, the latched trigger, the ramp, the
loss's gradient directions, config errors, and in training: exact resume, 1 vs 8 devices."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs import base, moe_entropy, schema, sharding, uoe
from model import entropy_trigger as et
from model import plan
from model.config import ConfigError, EntropyConfig
from model.transformer import Transformer
from train import mesh as mesh_lib
from train.checkpoint import Checkpointer
from train.step import make_step_fns

# --- entropies -----------------------------------------------------------------------------------


def test_uniform_is_one_and_one_hot_is_zero():
  h_tok, h_use = et.routing_entropies(jnp.full((6, 8), 1 / 8))
  np.testing.assert_allclose([h_tok, h_use], [1.0, 1.0], rtol=1e-6)
  same_expert = jax.nn.one_hot(jnp.full((6,), 3), 8)  # every token sure, all on one expert
  np.testing.assert_allclose(et.routing_entropies(same_expert), [0.0, 0.0], atol=1e-7)
  spread = jax.nn.one_hot(jnp.arange(16) % 8, 8)  # every token sure, experts used equally
  np.testing.assert_allclose(et.routing_entropies(spread), [0.0, 1.0], atol=1e-6)
  # Gradients stay finite where probabilities are exactly 0.
  grads = jax.grad(lambda p: sum(et.routing_entropies(p)))(spread)
  assert np.all(np.isfinite(grads))
  assert et.routing_entropies(jnp.ones((4, 1)))[0] == 0.0  # one expert: 0, not nan


def test_entropies_match_numpy_and_sigmoid_scores_are_normalised():
  logits = jax.random.normal(jax.random.PRNGKey(0), (32, 8)) * 2
  p = np.asarray(jax.nn.softmax(logits), np.float64)
  h_tok = -np.mean(np.sum(p * np.log(p), -1)) / np.log(8)
  pbar = p.mean(0)
  h_use = -np.sum(pbar * np.log(pbar)) / np.log(8)
  np.testing.assert_allclose(
    et.routing_entropies(et.routing_probs(logits)), [h_tok, h_use], rtol=1e-5
  )
  probs = et.routing_probs(logits, 'sigmoid')
  np.testing.assert_allclose(probs.sum(-1), 1.0, rtol=1e-6)
  np.testing.assert_allclose(
    probs, jax.nn.sigmoid(logits) / jax.nn.sigmoid(logits).sum(-1, keepdims=True), rtol=1e-6
  )


def test_loss_is_the_ramped_mix_of_coverage_and_specialisation():
  h_tok, h_use, bt, bu = 0.6, 0.9, 1e-3, 1e-2
  np.testing.assert_allclose(et.entropy_loss(h_tok, h_use, 0.0, bt, bu), -bu * h_use - bt * h_tok)
  np.testing.assert_allclose(et.entropy_loss(h_tok, h_use, 1.0, bt, bu), -bu * h_use + bt * h_tok)
  np.testing.assert_allclose(
    et.entropy_loss(h_tok, h_use, 0.25, bt, bu), -bu * h_use - 0.5 * bt * h_tok
  )


def test_gradient_direction_of_each_regime():
  """Gradient descent on a toy router: coverage raises H_tok, specialisation lowers it, and H_use
  stays high (it is rewarded in both)."""
  x_TD = jax.random.normal(jax.random.PRNGKey(0), (512, 16))
  w0_DE = 0.3 * jax.random.normal(jax.random.PRNGKey(1), (16, 8))
  entropies = lambda w_DE: et.routing_entropies(jax.nn.softmax(x_TD @ w_DE))
  h_tok0, h_use0 = entropies(w0_DE)
  assert 0.6 < h_tok0 < 0.9 and h_use0 > 0.99
  after = {}
  for regime, ramp in (('coverage', 0.0), ('specialisation', 1.0)):
    loss = jax.jit(jax.grad(lambda w: et.entropy_loss(*entropies(w), ramp, 1e-3, 1e-2)))
    w_DE = w0_DE
    for _ in range(50):
      w_DE = w_DE - 10.0 * loss(w_DE)
    after[regime] = entropies(w_DE)
  assert after['coverage'][0] > h_tok0 + 1e-3
  assert after['specialisation'][0] < h_tok0 - 1e-3
  for regime in after:
    assert after[regime][1] >= h_use0 - 1e-4, regime


# --- the trigger state machine -------------------------------------------------------------------


def _cfg(**kw):
  return EntropyConfig(
    enabled=True,
    **{'tau': 0.5, 'plateau': 0.0, 'plateau_window': 5, 'ema_decay': 0.0, 'ramp_steps': 4, **kw},
  )


def _run(trace, cfg):
  """States after each value of `trace` (a jitted lax.scan: the update is jit-safe)."""

  def body(state, h):
    state = et.update_trigger(state, h, cfg)
    return state, (state, et.ramp_weight(state, cfg.ramp_steps))

  _, (states, ramps) = jax.jit(
    lambda t: jax.lax.scan(body, et.init_trigger(cfg.plateau_window), t)
  )(jnp.asarray(trace, jnp.float32))
  return jax.device_get(states), np.asarray(ramps)


def _numpy_ema(trace, decay):
  ema, out = None, []
  for h in trace:
    ema = h if ema is None else decay * ema + (1 - decay) * h
    out.append(ema)
  return np.array(out)


def test_threshold_crossing_fires_on_the_ema():
  trace = np.linspace(0.95, 0.3, 40)
  cfg = _cfg(ema_decay=0.8)
  states, _ = _run(trace, cfg)
  ema = _numpy_ema(trace.astype(np.float32), 0.8)
  np.testing.assert_allclose(states.ema, ema, rtol=1e-6)
  first = int(np.argmax(ema < 0.5)) + 1  # updates are numbered from 1
  assert first > int(np.argmax(trace < 0.5)) + 1  # the EMA lags the raw trace
  np.testing.assert_array_equal(states.trigger_step, np.where(np.arange(1, 41) >= first, first, -1))
  np.testing.assert_array_equal(states.step, np.arange(1, 41))


def test_plateau_fires_when_the_ema_stops_moving():
  # Falls by 0.01 per step to 0.81 at update 12, then flat (above tau): with a window of 5 the
  # change over the window is 0.01 first at update 16 (EMA = trace, decay 0).
  trace = np.concatenate([0.92 - 0.01 * np.arange(12), np.full(10, 0.81)])
  states, _ = _run(trace, _cfg(plateau=0.015))
  change = np.abs(trace[5:] - trace[:-5])  # update t (1-based) compares EMA_t with EMA_{t-5}
  expected = int(np.argmax(change < 0.015)) + 6
  assert expected == 16
  assert states.trigger_step[-1] == expected
  assert np.all(states.trigger_step[: expected - 1] == -1)
  # The window must have filled: a flat start does not fire before update W + 1 = 6.
  states, _ = _run(np.full(8, 0.9), _cfg(plateau=0.02))
  np.testing.assert_array_equal(states.trigger_step, [-1] * 5 + [6] * 3)
  # plateau = 0 disables the plateau test.
  states, _ = _run(np.full(8, 0.9), _cfg())
  assert np.all(states.trigger_step == -1)


def test_noisy_dip_latches_and_the_ramp_is_exact():
  rng = np.random.default_rng(0)
  trace = 0.8 + 0.02 * rng.standard_normal(30)
  trace[9:11] = 0.3  # a two-step dip below tau, then back to 0.8 +- noise
  states, ramps = _run(trace, _cfg(ema_decay=0.3, ramp_steps=4))
  assert np.all(states.trigger_step[:9] == -1)
  assert np.all(states.trigger_step[9:] == 10)  # fired at update 10, never flipped back
  assert np.all(states.ema[15:] > 0.7)  # although the EMA recovered above tau
  # After update 10 the next step trains with 0, then 1/4, 2/4, 3/4, then 1 for good.
  np.testing.assert_array_equal(ramps[9:16], [0.0, 0.25, 0.5, 0.75, 1.0, 1.0, 1.0])
  assert np.all(ramps[:9] == 0.0) and np.all(ramps[13:] == 1.0)


def test_global_mode_shares_the_mean_over_layers():
  # Model stats: a scanned stage (layers stacked) and a looped one, as Transformer.update_state sees.
  stats = [
    {'mlp': {'expert_counts': jnp.ones((2, 8)), 'entropy': {'h_tok': jnp.array([0.2, 0.6])}}},
    [{'mlp': {'expert_counts': jnp.ones(8), 'entropy': {'h_tok': jnp.array(1.0)}}}],
  ]
  shared = et.share_across_layers(stats)
  np.testing.assert_allclose(shared[0]['mlp']['entropy']['h_tok'], [0.6, 0.6], rtol=1e-6)
  np.testing.assert_allclose(shared[1][0]['mlp']['entropy']['h_tok'], 0.6, rtol=1e-6)
  np.testing.assert_array_equal(shared[0]['mlp']['expert_counts'], stats[0]['mlp']['expert_counts'])
  assert et.share_across_layers([{}]) == [{}]
  # Two layers whose own EMAs cross tau = 0.5 at different steps fire together on the mean.
  cfg = _cfg()
  a, b = np.linspace(0.95, 0.15, 9), np.linspace(0.75, 0.55, 9)
  per_layer = [_run(t, cfg)[0].trigger_step[-1] for t in (a, b)]
  shared_trace = [
    float(et.share_across_layers({'entropy': {'h_tok': jnp.array([x, y])}})['entropy']['h_tok'][0])
    for x, y in zip(a, b)
  ]
  together = _run(shared_trace, cfg)[0].trigger_step[-1]
  assert per_layer[0] == 6 and per_layer[1] == -1
  assert together == 7  # mean 0.85 - 0.0625 (t - 1) < 0.5 first at update 7


@pytest.mark.parametrize('mode, fired', [('per_layer', [-1, 1]), ('global', [1, 1])])
def test_model_update_path_in_each_mode(mode, fired):
  """Transformer.update_state on the tiny MoE (one scanned stage of 2 MoE layers) with this step's
  H_tok 0.8 and 0.6 against tau 0.75: per layer only layer 1 fires; on the shared mean 0.7 both."""
  c = moe_entropy.get_config('tiny')
  c.entropy.update(mode=mode, tau=0.75)
  model = Transformer(schema.load(c, 1).model, rngs=nnx.Rngs(0))
  stats = [{'mlp': {et.STATS_KEY: {'h_tok': jnp.array([0.8, 0.6])}}}]  # as the forward stacks them
  nnx.jit(lambda m, s: m.update_state(s))(model, stats)
  monitor = model.stages[0].blocks.mlp.entropy  # both layers, stacked
  ema = [0.7, 0.7] if mode == 'global' else [0.8, 0.6]
  np.testing.assert_allclose(monitor.ema[...][:, 0], ema, rtol=1e-6)
  np.testing.assert_array_equal(monitor.trigger_step[...][:, 0], fired)
  np.testing.assert_array_equal(monitor.step[...][:, 0], [1, 1])


def test_uoe_gates_are_monitored_too():
  """With entropy routing on a UoE model, the SMHA and UoME gates each get a trigger: their loss
  joins the model loss, their metrics are logged per layer, and update_state advances them."""
  c = uoe.get_config('tiny')
  c.entropy.update(enabled=True, beta_tok=1e-2, beta_use=0.0)
  cfg = schema.load(c, 1).model
  assert plan.build(cfg).gated_layers == list(range(cfg.num_layers))
  model = Transformer(cfg, rngs=nnx.Rngs(0))
  tokens = jax.random.randint(jax.random.PRNGKey(0), (2, 16), 0, cfg.vocab_size)
  _, aux = model(tokens)
  m = aux['metrics']
  expected = 0.0
  for i in range(cfg.num_layers):
    for gate in ('attn', 'mlp'):
      p = f'layer_{i}/uoe/{gate}_'
      assert 0 < float(m[p + 'h_tok']) <= 1 and float(m[p + 'trigger_step']) == -1
      expected += (
        cfg.uoe.balance_weight * m[p + 'balance_loss']
        + cfg.uoe.z_loss_weight * m[p + 'z_loss']
        + m[p + 'entropy_loss']
      )
      np.testing.assert_allclose(m[p + 'entropy_loss'], -1e-2 * m[p + 'h_tok'], rtol=1e-6)
  np.testing.assert_allclose(aux['loss'], expected, rtol=1e-5)
  model.update_state(jax.lax.stop_gradient(aux['stats']))
  assert [s.scan for s in model.stages] == [True]  # the tiny UoE model: one scanned stage
  for gate in ('attn', 'mlp'):
    monitor = getattr(model.stages[0].blocks, gate).entropy  # every layer, stacked
    np.testing.assert_array_equal(monitor.step[...][:, 0], [1] * cfg.num_layers)
    # The EMA starts at the first step's H_tok.
    np.testing.assert_allclose(
      monitor.ema[...][:, 0],
      [m[f'layer_{i}/uoe/{gate}_h_tok'] for i in range(cfg.num_layers)],
      rtol=1e-6,
    )


# --- configuration -------------------------------------------------------------------------------


@pytest.mark.parametrize(
  'field, value',
  [
    ('tau', 0.0),
    ('tau', 1.0),
    ('tau', 1.5),
    ('beta_tok', -1e-3),
    ('beta_use', -1.0),
    ('ramp_steps', 0),
    ('plateau_window', 0),
    ('plateau', -1e-3),
    ('ema_decay', 1.0),
    ('mode', 'sometimes'),
  ],
)
def test_bad_entropy_config_is_a_one_line_error(field, value):
  c = moe_entropy.get_config('tiny')
  c.entropy[field] = value
  with pytest.raises(ConfigError, match=f'^entropy.{field}=') as e:
    schema.load(c, 1)
  assert '\n' not in str(e.value)


def test_entropy_without_routed_layers_is_an_error():
  c = base.get_config('tiny')
  c.entropy.enabled = True
  with pytest.raises(ConfigError, match='^entropy.enabled=True: the model has no routed layer'):
    schema.load(c, 1)


# --- in training ---------------------------------------------------------------------------------

STEPS, SAVE_AT = 10, 5


def _train_cfg(devices):
  """Tiny MoE + trigger tuned (larger init, higher lr) so layers fire at different steps <= 10."""
  c = moe_entropy.get_config('tiny')
  c.model.init_std = 0.2
  c.optimizer.learning_rate = 1e-2
  c.entropy.update(tau=0.665, plateau=0.0, ema_decay=0.5, ramp_steps=6, beta_tok=1e-2)
  c.mesh.shape = (devices, 1, 1, 1)
  c.checkpoint.async_save = False
  return schema.load(c, devices)


def _batches(cfg):
  rng = np.random.default_rng(0)
  toks = rng.integers(0, 257, (STEPS, cfg.train.batch_size, cfg.train.seq_len + 1), dtype=np.int32)
  return [{'inputs': t[:, :-1], 'targets': t[:, 1:]} for t in toks]


def _trigger(state) -> dict:
  return jax.device_get(state['model']['stages'][0]['blocks']['mlp']['entropy'])


def _train(devices, workdir=None, init=None):
  """Per-step metrics, the final state, the step functions, the checkpointer (a checkpoint at
  SAVE_AT when `workdir` is given) and the initial state on host (`init` skips compiling init)."""
  cfg = _train_cfg(devices)
  mesh = mesh_lib.make_mesh(cfg.mesh, jax.devices()[:devices])
  fns = make_step_fns(cfg, mesh, sharding.rules(cfg.mesh.rules))
  state = fns.init() if init is None else jax.device_put(init, fns.state_shardings)
  init, history = jax.device_get(state), []
  ckpt = Checkpointer(str(workdir), cfg.checkpoint) if workdir else None
  for step, batch in enumerate(_batches(cfg), 1):
    state, metrics = fns.train_step(state, jax.device_put(batch, fns.batch_sharding))
    history.append(jax.device_get(metrics))
    if ckpt and step == SAVE_AT:
      ckpt.save(step, state)
      ckpt.wait()
  return history, state, fns, ckpt, init


@pytest.fixture(scope='module')
def eight_devices(tmp_path_factory):
  return _train(8, tmp_path_factory.mktemp('entropy_ckpt'))


@pytest.mark.slow  # a whole 8-device training; the trigger's logic: the unit tests above
def test_trigger_in_training_survives_checkpoint_and_resume_exactly(eight_devices):
  history, final, fns, ckpt, _ = eight_devices
  trig = _trigger(final)
  fired = np.asarray(trig['trigger_step'][...])[:, 0]
  # Layer 1 fired before the checkpoint (its ramp is under way across the resume), layer 0 after.
  assert 0 < fired[1] < SAVE_AT < fired[0] <= STEPS, fired
  np.testing.assert_array_equal(np.asarray(trig['step'][...])[:, 0], [STEPS, STEPS])
  state = ckpt.restore(SAVE_AT, fns.abstract_state())
  np.testing.assert_array_equal(_trigger(state)['trigger_step'][...][:, 0], [-1, fired[1]])
  for batch in _batches(_train_cfg(8))[SAVE_AT:]:
    state, _ = fns.train_step(state, jax.device_put(batch, fns.batch_sharding))
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(state), jax.device_get(final))
  ckpt.close()
  # Metrics: the ramp weight each step's loss used in layer 1 (R = 6): the forward of step s
  # reads the state after s - 1 updates.
  ramps = [float(m['layer_1/moe/ramp_weight']) for m in history]
  t1 = int(fired[1])
  expected = [min((s - 1 - t1) / 6, 1.0) if s - 1 >= t1 else 0.0 for s in range(1, STEPS + 1)]
  assert expected[SAVE_AT - 1] < 1 < expected[-1] + 1e-9
  np.testing.assert_allclose(ramps, expected, rtol=1e-6)


@pytest.mark.slow  # a second whole training on one device; sharding itself: golden specs
def test_trigger_fires_at_the_same_step_on_one_and_eight_devices(eight_devices):
  history8, final8, _, _, init = eight_devices
  history1, final1, _, _, _ = _train(1, init=init)  # the same initial values, placed on 1 device
  trig1, trig8 = _trigger(final1), _trigger(final8)
  np.testing.assert_array_equal(trig1['trigger_step'][...], trig8['trigger_step'][...])
  np.testing.assert_allclose(trig1['ema'][...], trig8['ema'][...], rtol=1e-5)
  np.testing.assert_allclose(trig1['history'][...], trig8['history'][...], rtol=1e-5)
  # The decision is not a coin toss: up to its firing update, every EMA is clear of tau by far
  # more than the 1-vs-8-device differences (metrics of step s show the EMA after update s - 1).
  tau = _train_cfg(1).model.entropy.tau
  for layer in (0, 1):
    fired = int(trig8['trigger_step'][...][layer, 0])
    emas = [float(m[f'layer_{layer}/moe/h_tok_ema']) for m in history8[1 : fired + 1]]
    assert 0 < fired and min(abs(e - tau) for e in emas) > 1e-3, emas
    np.testing.assert_allclose(
      [float(m[f'layer_{layer}/moe/h_tok']) for m in history1],
      [float(m[f'layer_{layer}/moe/h_tok']) for m in history8],
      rtol=1e-5,
    )
