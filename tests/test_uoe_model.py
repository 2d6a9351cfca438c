"""Union of Experts in the model: config errors, the dense <-> UoE converter, sharding, training."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs import schema, sharding
from configs import uoe as uoe_config
from model import axes, plan, uoe_convert
from model.config import ConfigError
from model.transformer import Transformer
from tests.tiny_runs import train_tiny
from train import mesh as mesh_lib
from train.step import model_loss


@pytest.mark.parametrize(
  'fields, match',
  [
    (
      {'head_capacity': 3.0},
      r'uoe.head_capacity=3.0: head_capacity \* heads_per_token = 6 exceeds model.num_heads=4',
    ),
    (
      {'expert_capacity': 2.5},
      r'uoe.expert_capacity=2.5: expert_capacity \* experts_per_token = 5 exceeds '
      r'uoe.num_experts=4',
    ),
    (
      {'heads_per_token': 5},
      r'uoe.heads_per_token=5: expected -1 \(half\) or 1..model.num_heads=4',
    ),
    ({'num_experts': 3}, r'uoe.num_experts=3 must divide model.mlp_dim=128'),
    ({'experts_per_token': 5}, r'uoe.experts_per_token=5: expected 1..uoe.num_experts=4'),
    ({'paradigm': 'both'}, r'uoe.paradigm=.both.: expected one of'),
    ({'layers': (0, 2)}, r'uoe.layers=\(0, 2\): layer 2 is outside'),
  ],
)
def test_bad_uoe_configs_are_one_line_errors_naming_the_field(fields, match):
  c = uoe_config.get_config('tiny')
  c.uoe.update(**fields)
  with pytest.raises(ConfigError, match=match) as e:
    schema.load(c, 8)
  assert '\n' not in str(e.value)


def test_uome_experts_must_divide_over_the_expert_axis():
  c = uoe_config.get_config('tiny')
  c.uoe.update(num_experts=2, experts_per_token=1)
  c.mesh.update(shape=(1, 2, 1, 4), rules='fsdp_ep')
  with pytest.raises(ConfigError, match=r'uoe.num_experts=2 must divide over mesh axes'):
    schema.load(c, 8)


def test_causality_is_declared_by_the_uoe_layers():
  c = uoe_config.get_config('tiny')
  assert not plan.build(schema.load(c, 8).model).causal  # SMHA + UoME-DS: capacity over the row
  c.uoe.update(attention='dense', paradigm='expert_selection')
  assert plan.build(schema.load(c, 8).model).causal  # prefix-mean gate: causal, padding is safe


def _uoe_model_cfg(layers=(), scan=True, gate_outputs=False, **fields):
  """The tiny UoE model with every head and expert used at full capacity, released gates (or
  gates that multiply the outputs)."""
  c = uoe_config.get_config('tiny')
  c.model.scan_layers = scan
  c.uoe.update(
    layers=layers,
    heads_per_token=c.model.num_heads,
    head_capacity=1.0,
    experts_per_token=c.uoe.num_experts,
    expert_capacity=1.0,
    gate_outputs=gate_outputs,
    **fields,
  )
  return schema.load(c, 8).model


def _numpy_state(cfg, seed=0):
  """A model's pure-dict state with numpy-drawn values (eager init compiles op by op)."""
  abstract = nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0)))
  rng = np.random.default_rng(seed)
  draw = lambda a: jnp.asarray(
    (1.0 if a.ndim == 1 else 0.0) + 0.1 * rng.standard_normal(a.shape), a.dtype
  )
  return jax.tree.map(draw, nnx.to_pure_dict(nnx.state(abstract)))


def _logits(cfg, pure_state, tokens):
  model = nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0)))
  graphdef, state = nnx.split(model)
  nnx.replace_by_pure_dict(state, pure_state)

  @jax.jit
  def forward(state, tokens):
    return nnx.merge(graphdef, state)(tokens)[0]

  return forward(state, tokens)


@pytest.mark.parametrize('gate_outputs', [False, True])
def test_converted_dense_checkpoint_gives_the_same_logits_and_round_trips(gate_outputs):
  """Exact with released gates, and with output gates too: the converter's gates are uniform."""
  cfg = _uoe_model_cfg(gate_outputs=gate_outputs)
  dense_cfg = uoe_convert.dense_config(cfg)
  dense = _numpy_state(dense_cfg)
  converted = uoe_convert.convert_dense_state(dense, cfg)
  mlp = converted['stages'][0]['blocks']['mlp']
  assert mlp['w_gate'].shape == (2, 4, 64, 32) and mlp['router'].shape == (2, 64, 4)
  tokens = jnp.asarray(np.random.default_rng(1).integers(0, 257, (2, 64)), jnp.int32)
  y_dense = _logits(dense_cfg, dense, tokens)
  y_uoe = _logits(cfg, converted, tokens)
  np.testing.assert_allclose(y_uoe, y_dense, rtol=1e-5, atol=1e-5 * np.abs(y_dense).max())
  back = uoe_convert.convert_uoe_state(converted, cfg)
  jax.tree.map(np.testing.assert_array_equal, back, dense)


@pytest.mark.parametrize('scan', [True, False])
def test_converter_round_trips_when_only_some_layers_are_uoe(scan):
  """Layer 1 only: the dense model's one stage becomes two ([dense], [smha + uome]) and back."""
  cfg = _uoe_model_cfg(layers=(-1,), scan=scan)
  dense = _numpy_state(uoe_convert.dense_config(cfg))
  converted = uoe_convert.convert_dense_state(dense, cfg)
  assert len(converted['stages']) == 2
  expected = jax.tree.map(lambda a: a.shape, _numpy_state(cfg))
  assert jax.tree.map(lambda a: a.shape, converted) == expected
  jax.tree.map(np.testing.assert_array_equal, uoe_convert.convert_uoe_state(converted, cfg), dense)


def _loss_and_grads(cfg, pure_state, tokens, mesh=None):
  """Loss, gradients and routing metrics of one batch; sharded by cfg.mesh's rules over `mesh`
  (parameters, batch and the activations' logical constraints), or on one device without it."""
  graphdef, state = nnx.split(nnx.eval_shape(lambda: Transformer(cfg.model, rngs=nnx.Rngs(0))))
  nnx.replace_by_pure_dict(state, pure_state)
  batch = {'inputs': tokens[:, :-1], 'targets': tokens[:, 1:]}
  rules = sharding.rules(cfg.mesh.rules)
  if mesh is not None:
    state = jax.device_put(state, axes.state_shardings(state, mesh, rules))
    batch = jax.device_put(batch, mesh_lib.batch_sharding(mesh, rules))

  @jax.jit
  def run(state, batch):
    def loss_fn(model):
      return model_loss(model, batch)

    model = nnx.merge(graphdef, state)
    if mesh is None:
      (loss, (_, aux)), grads = nnx.value_and_grad(loss_fn, has_aux=True)(model)
    else:
      with axes.axis_rules(mesh, rules):
        (loss, (_, aux)), grads = nnx.value_and_grad(loss_fn, has_aux=True)(model)
    return loss, nnx.to_pure_dict(grads), aux['metrics']

  out = run(state, batch)
  w_gate = state['stages'][0]['blocks']['mlp']['w_gate'][...]
  return jax.device_get(out), w_gate.sharding


@pytest.mark.slow  # the default run checks the layout: tests/test_sharding_golden.py
def test_sharded_equals_unsharded():
  """Expert- and FSDP-sharded (fsdp_ep over 4 x 2 devices) equals one device: loss, every
  gradient (gates included) and the routing metrics."""
  c = uoe_config.get_config('tiny')
  c.mesh.update(shape=(1, 4, 1, 2), rules='fsdp_ep')
  cfg = schema.load(c, 8)
  pure_state = _numpy_state(cfg.model)
  tokens = jnp.asarray(
    np.random.default_rng(0).integers(0, 257, (cfg.train.batch_size, cfg.train.seq_len + 1)),
    jnp.int32,
  )
  (loss, grads, metrics), _ = _loss_and_grads(cfg, pure_state, tokens)
  mesh = mesh_lib.make_mesh(cfg.mesh, jax.devices())
  (loss8, grads8, metrics8), w_sharding = _loss_and_grads(cfg, pure_state, tokens, mesh)
  assert 'expert' in str(w_sharding.spec) and len(w_sharding.device_set) == 8
  np.testing.assert_allclose(loss8, loss, rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-7), grads8, grads)
  assert np.abs(grads['stages'][0]['blocks']['attn']['router']).max() > 0
  assert np.abs(grads['stages'][0]['blocks']['mlp']['router']).max() > 0
  for name in metrics:
    np.testing.assert_allclose(metrics8[name], metrics[name], rtol=1e-5, atol=1e-7)


@pytest.mark.slow  # a train-step compile: ~30 s of CPU on 2 cores (configs/uoe.py:tiny by hand: ~25 s)
def test_tiny_uoe_model_trains_and_logs_routing(tmp_path_factory):
  _, records = train_tiny(uoe_config, tmp_path_factory)
  assert [r['step'] for r in records] == [4, 8, 12, 16]
  assert records[-1]['loss'] < records[0]['loss'] - 0.5
  for layer in (0, 1):
    for part in ('attn', 'mlp'):
      for name in (
        'load_cv',
        'unselected_fraction',
        'dropped_fraction',
        'gate_entropy',
        'balance_loss',
        'z_loss',
      ):
        assert f'layer_{layer}/uoe/{part}_{name}' in records[-1], (part, name)
      assert 0 <= records[-1][f'layer_{layer}/uoe/{part}_unselected_fraction'] < 0.5
  assert records[-1]['aux_loss'] > 0


def test_flops_per_token_counts_what_the_selection_keeps():
  """With every head and expert at full capacity a UoE model costs the dense FLOPs plus its gates;
  at the default 50% selection the SMHA scores cost a quarter and the projections half."""
  c = uoe_config.get_config('tiny')
  cfg = schema.load(c, 1).model
  n, d, h, s = cfg.num_layers, cfg.d_model, cfg.num_heads, 64
  dense_cfg = dataclasses.replace(
    cfg, uoe=dataclasses.replace(cfg.uoe, attention='dense', feed_forward='mlp')
  )
  dense = plan.build(dense_cfg, s).flops_per_token
  full = dataclasses.replace(
    cfg, uoe=dataclasses.replace(cfg.uoe, heads_per_token=h, experts_per_token=cfg.uoe.num_experts)
  )
  gates = 6.0 * n * (d * h + d * cfg.uoe.num_experts)
  assert plan.build(full, s).flops_per_token == pytest.approx(dense + gates)
  half = plan.build(cfg, s).flops_per_token  # heads_per_token H/2, top-2 of 4 experts, capacity 1
  attn = d * h * cfg.head_dim * 2 + d * cfg.num_kv_heads * cfg.head_dim * 2
  saved = n * (6.0 * (attn / 2 + 3 * d * cfg.mlp_dim / 2) + 12.0 * d * s * 3 / 4)
  assert half == pytest.approx(dense + gates - saved)
  # Active parameters: the dense matmul weights plus gates, less the unselected half.
  dense_active = plan.build(dense_cfg, s).active_params
  assert plan.build(cfg, s).active_params == pytest.approx(
    dense_active - n * (attn / 2 + 3 * d * cfg.mlp_dim / 2 - d * h - d * cfg.uoe.num_experts)
  )
  assert dense_active == n * (attn + 3 * d * cfg.mlp_dim) + d * cfg.vocab_size


@pytest.mark.slow
def test_uoe_from_dense_command_converts_a_run_exactly_and_trains_on(tmp_path_factory):
  """A dense tiny run -> a full-capacity UoE run (uniform gates, gate_outputs): equal logits;
  train.train then continues the converted run."""
  from train import uoe_from_dense  # pylint: disable=g-import-not-at-top
  from train.train import train_and_evaluate  # pylint: disable=g-import-not-at-top

  c = uoe_config.get_config('tiny')
  c.data.cache_dir = str(tmp_path_factory.mktemp('corpus'))
  c.train.update(steps=4, log_every=2)
  c.uoe.update(attention='dense', feed_forward='mlp')
  dense_dir = str(tmp_path_factory.mktemp('dense'))
  train_and_evaluate(schema.load(c, jax.device_count()), dense_dir)
  c.uoe.update(
    attention='smha',
    feed_forward='uome',
    heads_per_token=c.model.num_heads,
    experts_per_token=c.uoe.num_experts,
    gate_outputs=True,
  )
  target = schema.load(c, jax.device_count())
  out_dir = str(tmp_path_factory.mktemp('uoe'))
  result = uoe_from_dense.convert_run(dense_dir, target, out_dir)
  assert result['full_capacity'] and result['dense_step'] == 4
  assert result['max_logit_change'] < 1e-4
  record = train_and_evaluate(target, out_dir)
  assert record['step'] == 4 and np.isfinite(record['loss'])
  c.model.d_model = 32
  with pytest.raises(ConfigError, match=r'model.d_model=32 differs from the dense run'):
    uoe_from_dense.convert_run(
      dense_dir, schema.load(c, jax.device_count()), str(tmp_path_factory.mktemp('bad'))
    )
