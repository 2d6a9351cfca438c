"""The routing-attention layer in the model: config errors, sharded update, training, resume,
sampling; the local-only layers of `attention.non_routing='local'`.

Training, resume and sampling compile a train step (~40 s each on 2 busy cores): marked slow.
"""

import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from configs import routing_transformer, schema
from eval.routing_report import read_metrics
from eval.sample import sample_checkpoint
from model import plan
from model.config import ConfigError, LayerSpec
from model.layers import apply_rope
from model.local_layer import LocalAttention
from model.routing_layer import RoutingAttention
from model.transformer import Transformer
from train.checkpoint import Checkpointer
from train.train import train_and_evaluate


def _config(**attention):
  c = routing_transformer.get_config('tiny')
  c.attention.update(**attention)
  return c


@pytest.mark.parametrize(
  'attention,train,match',
  [
    ({'window': 24}, {}, r'attention.window=24 must divide train.seq_len=64'),
    ({'num_clusters': 65}, {}, r'attention.num_clusters=65: more clusters than'),
    ({'window': 128}, {}, r'attention.window=128 exceeds train.seq_len=64'),
    ({'routing_layers': (0, 2)}, {}, r'attention.routing_layers=\(0, 2\): layer 2 is outside'),
    ({'routing_heads': 1}, {}, r'attention.routing_heads=1: the 3 local heads'),
    ({'kmeans_decay': 1.0}, {}, r'attention.kmeans_decay=1.0'),
    ({'non_routing': 'sparse'}, {}, r"attention.non_routing='sparse': expected one of"),
    ({'routing_scale': 'sqrt'}, {}, r"attention.routing_scale='sqrt': expected one of"),
  ],
)
def test_bad_routing_configs_name_the_field(attention, train, match):
  c = _config(**attention)
  c.train.update(**train)
  with pytest.raises(ConfigError, match=match):
    schema.load(c, 8)


@pytest.mark.parametrize('routing_scale,scale', [('rsqrt_dim', 16**-0.5), ('none', 1.0)])
def test_routing_scale_option(routing_scale, scale):
  """'rsqrt_dim': K**-0.5 on the in-cluster logits; 'none': 1, as the paper's code."""
  cfg = schema.load(_config(routing_scale=routing_scale), 8)
  layer = nnx.eval_shape(lambda: RoutingAttention(cfg.model, rngs=nnx.Rngs(0)))
  assert cfg.model.head_dim == 16 and layer.scale == scale


def test_clusters_derived_from_seq_len_and_layers_split():
  c = _config()
  c.model.num_layers = 3
  cfg = schema.load(c, 8)
  assert cfg.attention.num_clusters == 4
  model = nnx.eval_shape(lambda: Transformer(cfg.model, rngs=nnx.Rngs(0)))
  state = nnx.state(model)
  assert len(state['stages']) == 2  # [local], [routing, routing]
  means = state['stages'][1]['blocks']['attn']['means']
  assert means.shape == (2, 2, 4, 16)  # [layers, routing heads, clusters, head dim]


def _numpy_model(cfg):
  """The real structure with numpy-drawn values (eager init compiles op by op: ~10 s here)."""
  model = nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0)))
  state = nnx.state(model)
  rng = np.random.default_rng(0)

  def draw(path, a):
    if path[-1].key == 'ema_count':
      return jnp.ones(a.shape, a.dtype)
    scale = 1.0 if path[-1].key in ('means', 'ema_sum') else 0.1
    return jnp.asarray(
      (1.0 if a.ndim == 1 else 0.0) + scale * rng.standard_normal(a.shape), a.dtype
    )

  nnx.replace_by_pure_dict(state, jax.tree_util.tree_map_with_path(draw, nnx.to_pure_dict(state)))
  nnx.update(model, state)
  return model


def test_update_is_identical_when_the_batch_is_split_across_8_devices():
  cfg = schema.load(_config(), 8)
  graphdef, state = nnx.split(_numpy_model(cfg.model))
  toks = jnp.asarray(np.random.default_rng(0).integers(0, 257, (8, 64)), jnp.int32)

  @jax.jit
  def step(state, toks):
    m = nnx.merge(graphdef, state)
    _, aux = m(toks)
    m.update_state(jax.lax.stop_gradient(aux['stats']))
    return nnx.state(m), aux['metrics']

  mesh = jax.make_mesh((8,), ('data',), axis_types=(jax.sharding.AxisType.Auto,))
  sharded = jax.device_put(toks, NamedSharding(mesh, PartitionSpec('data')))
  assert len(sharded.sharding.device_set) == 8
  one, metrics_one = step(
    jax.device_put(state, jax.devices()[0]), jax.device_put(toks, jax.devices()[0])
  )
  eight, metrics_eight = step(jax.device_put(state, NamedSharding(mesh, PartitionSpec())), sharded)
  before = state['stages'][0]['blocks']['attn']['means'][...]
  after = one['stages'][0]['blocks']['attn']['means'][...]
  assert not np.allclose(before, after)
  jax.tree.map(
    lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7),
    nnx.to_pure_dict(one),
    nnx.to_pure_dict(eight),
  )
  jax.tree.map(
    lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7), metrics_one, metrics_eight
  )


def _train_cfg(cache_dir, **train):
  c = _config()
  c.data.cache_dir = str(cache_dir)
  c.train.update(log_every=1, **train)
  return schema.load(c, jax.device_count())


def _restore(workdir, cfg):
  from configs import sharding
  from train import mesh as mesh_lib
  from train.step import make_step_fns

  fns = make_step_fns(cfg, mesh_lib.make_mesh(cfg.mesh), sharding.rules(cfg.mesh.rules))
  ckpt = Checkpointer(str(workdir), cfg.checkpoint, read_only=True)
  return jax.device_get(ckpt.restore(ckpt.latest_step(), fns.abstract_state()))


@pytest.fixture(scope='module')
def straight(tmp_path_factory):
  cache_dir = tmp_path_factory.mktemp('corpus')
  workdir = tmp_path_factory.mktemp('routing_straight')
  cfg = _train_cfg(cache_dir, steps=12)
  train_and_evaluate(cfg, str(workdir))
  return workdir, cfg, cache_dir


@pytest.mark.slow
def test_tiny_routing_transformer_trains(straight):
  workdir, cfg, _ = straight
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    records = [json.loads(line) for line in f]
  assert records[-1]['loss'] < records[0]['loss'] - 0.5
  for key in (
    'occupancy_min',
    'occupancy_max',
    'unpicked_fraction',
    'multi_picked_fraction',
    'commitment_loss',
    'centroid_drift',
  ):
    assert f'layer_1/routing/{key}' in records[-1]
  assert records[-1]['aux_loss'] > 0
  means = _restore(workdir, cfg)['model']['stages'][0]['blocks']['attn']['means']
  init = jax.device_get(nnx.state(Transformer(cfg.model, rngs=nnx.Rngs(cfg.train.seed))))
  assert not np.allclose(means, init['stages'][0]['blocks']['attn']['means'][...])


@pytest.mark.slow
def test_kmeans_state_survives_checkpoint_and_resume(straight, tmp_path):
  straight_dir, cfg, _ = straight
  workdir = tmp_path / 'resumed'
  train_and_evaluate(
    dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, stop_after=5)), str(workdir)
  )
  train_and_evaluate(cfg, str(workdir))
  a, b = _restore(straight_dir, cfg), _restore(workdir, cfg)
  jax.tree.map(np.testing.assert_array_equal, a, b)
  kmeans = b['model']['stages'][0]['blocks']['attn']
  assert {'means', 'ema_sum', 'ema_count'} <= set(kmeans)


@pytest.mark.slow
def test_sampling_a_routing_checkpoint_is_deterministic(straight):
  workdir, _, _ = straight
  run = lambda seed: sample_checkpoint(str(workdir), 'import ', max_new_tokens=3, seed=seed)
  first = run(5)
  assert first == run(5) and first['step'] == 12 and len(first['tokens']) <= 3


def _local_reference(layer, x, positions, window, segment_ids=None):
  """The layer's projections and RoPE around dense attention with the block-local causal mask."""
  l = x.shape[1]
  q = apply_rope(jnp.einsum('bld,dhk->blhk', x, layer.wq[...]), positions, layer.rope_theta)
  k = apply_rope(jnp.einsum('bld,dgk->blgk', x, layer.wk[...]), positions, layer.rope_theta)
  v = jnp.einsum('bld,dgk->blgk', x, layer.wv[...])
  i, j = np.arange(l)[:, None], np.arange(l)[None, :]
  mask = jnp.asarray((j <= i) & (j >= (i // window - 1) * window))[None, None]
  if segment_ids is not None:
    mask = mask & (segment_ids[:, None, :, None] == segment_ids[:, None, None, :])
  o = jax.nn.dot_product_attention(q, k, v, mask=mask, implementation='xla')
  return jnp.einsum('blhk,hkd->bld', o, layer.wo[...])


@pytest.mark.parametrize('l,segments', [(30, False), (32, True)])
def test_local_layer_equals_dense_attention_with_the_block_local_mask(l, segments):
  """GQA (4 heads, 2 kv heads), a window of 8 not dividing L, packed segments with their own
  positions; outputs at positions <= t never depend on inputs after t."""
  c = _config(local_window=8, non_routing='local')
  cfg = schema.load(c, 8).model
  layer = LocalAttention(cfg, rngs=nnx.Rngs(0))
  assert layer.wq.shape == (64, 4, 16) and layer.wk.shape == layer.wv.shape == (64, 2, 16)
  assert layer.wo.shape == (4, 16, 64)
  b = 2
  x = jnp.asarray(np.random.default_rng(0).standard_normal((b, l, 64)), jnp.float32)
  bounds = [0, 11, 23, l]
  seg = np.repeat([np.repeat(np.arange(3), np.diff(bounds))], b, 0)
  pos = np.concatenate([np.arange(n) for n in np.diff(bounds)]) if segments else np.arange(l)
  positions = jnp.asarray(np.repeat(pos[None], b, 0), jnp.int32)
  segment_ids = jnp.asarray(seg, jnp.int32) if segments else None
  run = jax.jit(lambda x: layer(x, positions, segment_ids))
  got = run(x)
  np.testing.assert_allclose(
    got, _local_reference(layer, x, positions, 8, segment_ids), rtol=1e-5, atol=1e-6
  )
  t = 17
  changed = run(x.at[:, t + 1 :].add(1.0))
  np.testing.assert_array_equal(changed[:, : t + 1], got[:, : t + 1])
  assert not np.allclose(changed[:, t + 1 :], got[:, t + 1 :])


def test_non_routing_local_layer_specs_and_parameters():
  """Local layers between the routing layers; the same parameters (and matmul weights) as dense."""

  def model_cfg(**attention):
    c = _config(**attention)
    c.model.num_layers = 4
    return schema.load(c, 8).model

  spec = lambda *names: tuple(LayerSpec(n) for n in names)
  local = model_cfg(non_routing='local')
  assert local.layer_specs() == spec('local', 'local', 'routing', 'routing')
  assert model_cfg(non_routing='dense').layer_specs() == spec(
    'dense', 'dense', 'routing', 'routing'
  )
  assert model_cfg(kind='dense', non_routing='local').layer_specs() == spec(*['dense'] * 4)
  assert model_cfg(non_routing='local', routing_layers=(1,)).layer_specs() == spec(
    'local', 'routing', 'local', 'local'
  )
  assert routing_transformer.get_config().attention.non_routing == 'local'

  dense = model_cfg(non_routing='dense')
  assert plan.build(local).params == plan.build(dense).params
  assert plan.build(local, 64).active_params == plan.build(dense, 64).active_params
  state = nnx.state(nnx.eval_shape(lambda: Transformer(local, rngs=nnx.Rngs(0))))
  local_attn = state['stages'][0]['blocks']['attn']
  assert set(local_attn) == {'wq', 'wk', 'wv', 'wo'}
  assert local_attn['wk'].shape == (2, 64, 2, 16)  # [layers, D, G, K]


@pytest.mark.slow
def test_tiny_routing_transformer_with_local_layers_trains(tmp_path):
  c = _config(non_routing='local')
  c.model.num_layers = 3  # :tiny's two layers are both routing layers; one local layer before them
  c.data.cache_dir = str(tmp_path / 'corpus')
  c.train.update(steps=6, log_every=1)
  cfg = schema.load(c, jax.device_count())
  assert [s.attention for s in cfg.model.layer_specs()] == ['local', 'routing', 'routing']
  train_and_evaluate(cfg, str(tmp_path / 'run'))
  records = read_metrics(str(tmp_path / 'run'))
  assert len(records) == 6 and all(np.isfinite(r['loss']) for r in records)
  assert records[-1]['loss'] < records[0]['loss']
  assert 'layer_0/routing/occupancy_min' not in records[-1]
  assert 'layer_1/routing/occupancy_min' in records[-1]
