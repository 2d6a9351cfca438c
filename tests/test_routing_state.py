"""The routed-layer protocol: stats from the forward pass update RoutingState after the gradient."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs import schema, sharding, tiny
from model import axes, registry
from model.config import LayerSpec, ModelConfig
from model.layers import MLP
from train import mesh as mesh_lib
from train.step import make_step_fns


class EmaMLP(MLP):
  """A dense MLP that tracks an EMA of its input mean and a step counter as RoutingState."""

  def __init__(self, cfg, *, rngs):
    super().__init__(cfg, rngs=rngs)
    self.ema = axes.routing_state(jnp.zeros(cfg.d_model), ('norm',))
    self.updates = axes.routing_state(jnp.zeros(1), ('norm',))

  def __call__(self, x_BLD, segment_ids_BL=None):
    mean_D = x_BLD.astype(jnp.float32).mean((0, 1))
    return super().__call__(x_BLD, segment_ids_BL), {
      'stats': {'mean': mean_D},
      'metrics': {'ema_norm': jnp.linalg.norm(self.ema[...])},
    }

  def update_state(self, stats):
    self.ema[...] = 0.5 * self.ema[...] + 0.5 * stats['mean']
    self.updates[...] = self.updates[...] + 1


@pytest.fixture
def toy_layers(monkeypatch):
  monkeypatch.setitem(registry.FEED_FORWARD, 'ema', EmaMLP)
  specs = (LayerSpec(), LayerSpec(feed_forward='ema'), LayerSpec(feed_forward='ema'))
  monkeypatch.setattr(ModelConfig, 'layer_specs', lambda cfg: specs[: cfg.num_layers])


@pytest.mark.parametrize('scan', [True, pytest.param(False, marks=pytest.mark.slow)])  # loop: slow
def test_stats_update_state_after_the_step(toy_layers, scan):
  cfg = schema.load(tiny.get_config(), 8)
  cfg = dataclasses.replace(
    cfg, model=dataclasses.replace(cfg.model, num_layers=3, scan_layers=scan)
  )
  mesh = mesh_lib.make_mesh(cfg.mesh)
  fns = make_step_fns(cfg, mesh, sharding.rules(cfg.mesh.rules))
  state = fns.init()
  rng = np.random.default_rng(0)
  toks = rng.integers(0, 257, (cfg.train.batch_size, cfg.train.seq_len + 1), dtype=np.int32)
  batch = jax.device_put({'inputs': toks[:, :-1], 'targets': toks[:, 1:]}, fns.batch_sharding)
  _, aux = nnx.jit(lambda m, t: m(t))(fns.model(jax.tree.map(jnp.copy, state)), batch['inputs'])
  assert len(state['model']['stages']) == 2  # [mlp], [ema, ema]: two stages
  assert 'ema' not in str(jax.tree_util.tree_structure(state['opt']))  # not an optimizer target

  state, metrics = fns.train_step(state, batch)
  ema_state = state['model']['stages'][1]['blocks']
  layers = ema_state['mlp'] if scan else {i: b['mlp'] for i, b in ema_state.items()}
  if scan:
    np.testing.assert_array_equal(layers['updates'][...], [[1.0], [1.0]])
    expected = 0.5 * np.stack([np.asarray(aux['stats'][1]['mlp']['mean'])])[0]
    np.testing.assert_allclose(layers['ema'][...], expected, rtol=1e-5)
  else:
    for i, layer in layers.items():
      assert float(layer['updates'][...][0]) == 1.0
      np.testing.assert_allclose(
        layer['ema'][...], 0.5 * np.asarray(aux['stats'][1][i]['mlp']['mean']), rtol=1e-5
      )
  assert 'layer_1/ema_norm' in metrics and 'layer_2/ema_norm' in metrics
  state, _ = fns.train_step(state, batch)
  ema_state = state['model']['stages'][1]['blocks']
  updates = ema_state['mlp']['updates'][...] if scan else ema_state[0]['mlp']['updates'][...]
  assert np.all(np.asarray(updates) == 2.0)
