"""The routing-attention layer in the model: config errors, sharded update, training, resume, sampling.

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
from eval.sample import sample_checkpoint
from model.config import ConfigError
from model.transformer import Transformer
from train.checkpoint import Checkpointer
from train.train import train_and_evaluate


def _config(**attention):
  c = routing_transformer.get_config('tiny')
  c.attention.update(**attention)
  return c


@pytest.mark.parametrize('attention,train,match', [
    ({'window': 24}, {}, r'attention.window=24 must divide train.seq_len=64'),
    ({'num_clusters': 65}, {}, r'attention.num_clusters=65: more clusters than'),
    ({'window': 128}, {}, r'attention.window=128 exceeds train.seq_len=64'),
    ({'routing_layers': (0, 2)}, {}, r'attention.routing_layers=\(0, 2\): layer 2 is outside'),
    ({'routing_heads': 1}, {}, r'attention.routing_heads=1: the 3 local heads'),
    ({'kmeans_decay': 1.0}, {}, r'attention.kmeans_decay=1.0'),
])
def test_bad_routing_configs_name_the_field(attention, train, match):
  c = _config(**attention)
  c.train.update(**train)
  with pytest.raises(ConfigError, match=match):
    schema.load(c, 8)


def test_clusters_derived_from_seq_len_and_layers_split():
  c = _config()
  c.model.num_layers = 3
  cfg = schema.load(c, 8)
  assert cfg.attention.num_clusters == 4
  model = nnx.eval_shape(lambda: Transformer(cfg.model, rngs=nnx.Rngs(0)))
  state = nnx.state(model)
  assert len(state['stages']) == 2  # [dense], [routing, routing]
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
    return jnp.asarray((1.0 if a.ndim == 1 else 0.0) + scale * rng.standard_normal(a.shape), a.dtype)

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
  one, metrics_one = step(jax.device_put(state, jax.devices()[0]), jax.device_put(toks, jax.devices()[0]))
  eight, metrics_eight = step(jax.device_put(state, NamedSharding(mesh, PartitionSpec())), sharded)
  before = state['stages'][0]['blocks']['attn']['means'][...]
  after = one['stages'][0]['blocks']['attn']['means'][...]
  assert not np.allclose(before, after)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7),
               nnx.to_pure_dict(one), nnx.to_pure_dict(eight))
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7),
               metrics_one, metrics_eight)


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
  for key in ('occupancy_min', 'occupancy_max', 'unpicked_fraction', 'multi_picked_fraction',
              'commitment_loss', 'centroid_drift'):
    assert f'layer_1/routing/{key}' in records[-1]
  assert records[-1]['aux_loss'] > 0
  means = _restore(workdir, cfg)['model']['stages'][0]['blocks']['attn']['means']
  init = jax.device_get(nnx.state(Transformer(cfg.model, rngs=nnx.Rngs(cfg.train.seed))))
  assert not np.allclose(means, init['stages'][0]['blocks']['attn']['means'][...])


@pytest.mark.slow
def test_kmeans_state_survives_checkpoint_and_resume(straight, tmp_path):
  straight_dir, cfg, _ = straight
  workdir = tmp_path / 'resumed'
  train_and_evaluate(dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, stop_after=5)),
                     str(workdir))
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
