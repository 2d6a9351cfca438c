"""The layer plan (`model.plan`) against the model it describes, for every config in configs/."""

import importlib
import pathlib

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

from configs import schema
from model import plan, registry
from model.config import ConfigError, LayerSpec
from model.transformer import Transformer

_NOT_EXPERIMENTS = {'__init__', 'cli', 'from_run', 'model_checks', 'schema', 'sharding', 'sweeps'}
CONFIGS = sorted(
  p.stem
  for p in (pathlib.Path(__file__).parents[1] / 'configs').glob('*.py')
  if p.stem not in _NOT_EXPERIMENTS
)


def _load(name: str, arg: str | None) -> schema.Config:
  module = importlib.import_module(f'configs.{name}')
  return schema.load(module.get_config(arg) if arg else module.get_config(), 1)


def _layer_params(model: Transformer, first: int, count: int, stage) -> list[int]:
  """Learned parameters of each layer of a stage, from the built (abstract) model."""
  leaves = jax.tree.leaves(nnx.state(stage, nnx.Param))
  if model.cfg.scan_layers:
    per_layer = sum(leaf.size // count for leaf in leaves)
    return [per_layer] * count
  return [
    sum(leaf.size for leaf in jax.tree.leaves(nnx.state(block, nnx.Param)))
    for block in stage.blocks
  ]


@pytest.mark.parametrize('arg', [None, 'tiny'])
@pytest.mark.parametrize('name', CONFIGS)
def test_plan_counts_what_the_config_builds(name, arg):
  """Every config at its full size and :tiny: the plan's parameter count per layer and in total
  equals the built model's, and the model's stages are the plan's runs of equal specs."""
  cfg = _load(name, arg)
  layer_plan = plan.build(cfg.model, cfg.train.seq_len)
  model = nnx.eval_shape(lambda: Transformer(cfg.model, rngs=nnx.Rngs(0)))
  total = sum(leaf.size for leaf in jax.tree.leaves(nnx.state(model, nnx.Param)))
  assert layer_plan.params == total
  built = []
  for stage in model.stages:
    built += _layer_params(model, stage.first, stage.count, stage)
  assert [layer.params for layer in layer_plan.layers] == built
  assert layer_plan.flops_per_token > 6 * layer_plan.active_params > 0
  assert layer_plan.causal == model.causal == (not layer_plan.reasons)


@pytest.mark.parametrize('name', CONFIGS)
def test_plan_names_the_metrics_each_layer_reports(name):
  """The metric prefixes the plan gives each layer are exactly the ones its forward pass logs."""
  cfg = _load(name, 'tiny')
  layer_plan = plan.build(cfg.model, cfg.train.seq_len)
  tokens = jnp.zeros((2, cfg.train.seq_len), jnp.int32)
  model = nnx.eval_shape(lambda: Transformer(cfg.model, rngs=nnx.Rngs(0)))
  metrics = nnx.eval_shape(lambda m: m(tokens)[1]['metrics'], model)
  for layer in layer_plan.layers:
    names = [k.split('/', 1)[1] for k in metrics if k.startswith(f'layer_{layer.index}/')]
    reported = {p for p in layer.metrics if any(n.startswith(p) for n in names)}
    assert reported == set(layer.metrics), (layer.index, names)
    assert all(any(n.startswith(p) for p in layer.metrics) for n in names), names
  assert plan.build(cfg.model).gated_layers == [
    layer.index
    for layer in layer_plan.layers
    if layer.spec.feed_forward in ('moe', 'uome') or layer.spec.attention == 'smha'
  ]


def test_unknown_router_or_layer_kind_lists_the_known_ones():
  c = importlib.import_module('configs.moe_topk').get_config('tiny')
  c.moe.router = 'hash'
  with pytest.raises(ConfigError) as e:
    schema.load(c, 1)
  assert str(e.value) == "moe.router='hash': unknown router; known: topk, expert_choice"
  with pytest.raises(ConfigError, match=r'unknown attention kind; known: dense, local, routing'):
    registry.lookup('attention kind', 'linear', 'layer 0 attention')
  cfg = _load('base', 'tiny').model

  class Unknown(type(cfg)):
    def layer_specs(self):
      return (LayerSpec(feed_forward='glu'),) * self.num_layers

  with pytest.raises(ConfigError, match=r"^layer 0 feed_forward='glu': unknown feed-forward kind"):
    plan.build(Unknown(**{f: getattr(cfg, f) for f in cfg.__dataclass_fields__}))


def test_per_token_counts_need_a_sequence_length():
  cfg = _load('base', 'tiny').model
  assert plan.build(cfg).params > 0
  with pytest.raises(ValueError, match='need a sequence length'):
    _ = plan.build(cfg).flops_per_token
