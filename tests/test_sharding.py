"""Sharded runs equal the unsharded run (slow); parameters are really sharded per preset."""

import dataclasses
import math

import jax
import numpy as np
import pytest
from flax import nnx

from configs import schema, sharding, tiny
from model import axes
from train import mesh as mesh_lib
from train.step import make_step_fns, model_loss

MESHES = [
  ((1, 1, 1, 1), 'dp'),
  ((8, 1, 1, 1), 'dp'),
  ((2, 4, 1, 1), 'fsdp'),
  ((2, 2, 2, 1), 'fsdp_tp'),
  ((1, 4, 1, 2), 'fsdp_ep'),
]


def _cfg(shape, rules):
  cfg = schema.load(tiny.get_config(), 8)
  mesh = schema.MeshConfig(shape=shape, rules=rules)
  cfg = dataclasses.replace(cfg, mesh=mesh)
  schema.validate(cfg, math.prod(shape))
  return cfg


def _batch(cfg):
  rng = np.random.default_rng(0)
  tokens = rng.integers(0, 257, size=(cfg.train.batch_size, cfg.train.seq_len + 1), dtype=np.int32)
  return {'inputs': tokens[:, :-1], 'targets': tokens[:, 1:]}


def _run(shape, rules):
  """Loss, gradients and the state after one train step, gathered to host numpy."""
  cfg = _cfg(shape, rules)
  mesh = mesh_lib.make_mesh(cfg.mesh, jax.devices()[: math.prod(shape)])
  fns = make_step_fns(cfg, mesh, sharding.rules(rules))
  state = fns.init()
  batch = jax.device_put(_batch(cfg), fns.batch_sharding)

  @jax.jit
  def loss_and_grads(model_state, batch):
    with axes.axis_rules(mesh, sharding.rules(rules)):
      model = nnx.merge(fns.model_def, model_state)
      grad_fn = nnx.value_and_grad(lambda m: model_loss(m, batch)[0])
      return grad_fn(model)

  loss, grads = loss_and_grads(state['model'], batch)
  loss, grads = jax.device_get((loss, nnx.to_pure_dict(grads)))
  new_state, metrics = fns.train_step(state, batch)
  return loss, grads, jax.device_get(nnx.to_pure_dict(new_state['model'])), metrics


@pytest.fixture(scope='module')
def reference():
  return _run(*MESHES[0])


# Each sharded run costs ~15-30 s of compilation on 2 cores: all are slow. The default run checks
# every preset's layout as text (tests/test_sharding_golden.py), and sharded numerics through the
# 8-device routing-state and entropy-trigger tests.
@pytest.mark.slow
@pytest.mark.parametrize('shape, rules', [pytest.param(s, r, id=r) for s, r in MESHES[1:]])
def test_sharded_equals_single_device(reference, shape, rules):
  loss, grads, params, metrics = _run(shape, rules)
  ref_loss, ref_grads, ref_params, ref_metrics = reference
  np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
  jax.tree.map(
    lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-7), grads, ref_grads
  )
  jax.tree.map(
    lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), params, ref_params
  )
  np.testing.assert_allclose(metrics['grad_norm'], ref_metrics['grad_norm'], rtol=1e-5)


def _per_device_bytes(shape, rules):
  cfg = _cfg(shape, rules)
  mesh = mesh_lib.make_mesh(cfg.mesh, jax.devices()[: math.prod(shape)])
  fns = make_step_fns(cfg, mesh, sharding.rules(rules))
  state = fns.init()
  device = jax.devices()[0]
  leaves = jax.tree.leaves(state['model'])
  on_device = sum(s.data.nbytes for x in leaves for s in x.addressable_shards if s.device == device)
  return on_device, sum(x.nbytes for x in leaves), state, mesh


def test_parameters_are_sharded_as_the_preset_says():
  dp_bytes, total, _, _ = _per_device_bytes((8, 1, 1, 1), 'dp')
  assert dp_bytes == total  # data parallel: a full replica per device
  fsdp_bytes, total, state, mesh = _per_device_bytes((1, 8, 1, 1), 'fsdp')
  expected = 0
  for x in jax.tree.leaves(state['model']):
    spec = x.sharding.spec
    split = math.prod(mesh.shape[a] for p in spec if p for a in ((p,) if isinstance(p, str) else p))
    expected += x.nbytes // split
  assert fsdp_bytes == expected
  assert fsdp_bytes < total / 6  # everything but the tiny norm scales is split 8 ways


def test_tensor_parallel_shards_heads_and_mlp():
  _, _, state, _ = _per_device_bytes((1, 4, 2, 1), 'fsdp_tp')
  specs = {
    '/'.join(map(str, path)): x.sharding.spec
    for path, x in jax.tree_util.tree_leaves_with_path(state['model'])
  }
  assert any('tensor' in str(s) for s in specs.values())
  assert any('fsdp' in str(s) for s in specs.values())
