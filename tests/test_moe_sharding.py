"""Expert parallelism: expert-sharded MoE runs equal the unsharded run, gradients and state included."""

import dataclasses
import math

import jax
import numpy as np
import pytest
from flax import nnx

from configs import moe_lossfree, moe_topk, schema, sharding
from model import axes
from train import mesh as mesh_lib
from train.step import make_step_fns, model_loss

REFERENCE = ((1, 1, 1, 1), 'dp')
EXPERT_MESHES = [((1, 4, 1, 2), 'fsdp_ep'), ((1, 2, 1, 4), 'fsdp_ep')]
# expert=4 costs another ~60 s of compilation on 2 cores: slow.
_EP_CASES = [
  pytest.param(*EXPERT_MESHES[0], id='expert2'),
  pytest.param(*EXPERT_MESHES[1], id='expert4', marks=pytest.mark.slow),
]


def _cfg(module, shape, rules, **moe_fields):
  cfg = schema.load(module.get_config('tiny'), 8)
  moe = dataclasses.replace(cfg.model.moe, **moe_fields)
  cfg = dataclasses.replace(
    cfg,
    mesh=schema.MeshConfig(shape=shape, rules=rules),
    model=dataclasses.replace(cfg.model, moe=moe),
  )
  schema.validate(cfg, math.prod(shape))
  return cfg


def _run(cfg):
  """Loss, gradients and the model state after one train step (bias updated), on host."""
  shape = cfg.mesh.shape
  mesh = mesh_lib.make_mesh(cfg.mesh, jax.devices()[: math.prod(shape)])
  fns = make_step_fns(cfg, mesh, sharding.rules(cfg.mesh.rules))
  state = fns.init()
  rng = np.random.default_rng(0)
  tokens = rng.integers(0, 257, size=(cfg.train.batch_size, cfg.train.seq_len + 1), dtype=np.int32)
  batch = jax.device_put({'inputs': tokens[:, :-1], 'targets': tokens[:, 1:]}, fns.batch_sharding)

  @jax.jit
  def loss_and_grads(model_state, batch):
    with axes.axis_rules(mesh, sharding.rules(cfg.mesh.rules)):
      model = nnx.merge(fns.model_def, model_state)
      return nnx.value_and_grad(lambda m: model_loss(m, batch)[0])(model)

  loss, grads = jax.device_get(jax.tree.map(lambda x: x, loss_and_grads(state['model'], batch)))
  new_state, metrics = fns.train_step(state, batch)
  return (
    loss,
    nnx.to_pure_dict(grads),
    jax.device_get(nnx.to_pure_dict(new_state['model'])),
    jax.device_get(metrics),
    new_state,
  )


def _compare(run, ref):
  loss, grads, params, metrics, _ = run
  ref_loss, ref_grads, ref_params, ref_metrics, _ = ref
  np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
  jax.tree.map(
    lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-7), grads, ref_grads
  )
  jax.tree.map(
    lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), params, ref_params
  )
  for name in ('layer_0/moe/load_cv', 'layer_1/moe/router_entropy', 'grad_norm'):
    np.testing.assert_allclose(metrics[name], ref_metrics[name], rtol=1e-5)


@pytest.fixture(scope='module')
def dropless_reference():
  return _run(_cfg(moe_lossfree, *REFERENCE))


@pytest.mark.slow  # the default run checks the layout: tests/test_sharding_golden.py
@pytest.mark.parametrize('shape, rules', _EP_CASES)
def test_dropless_expert_sharded_equals_unsharded(dropless_reference, shape, rules):
  run = _run(_cfg(moe_lossfree, shape, rules))
  _compare(run, dropless_reference)
  w_gate = run[-1]['model']['stages'][0]['blocks']['mlp']['w_gate'][...]
  assert 'expert' in str(w_gate.sharding.spec)  # the experts really are split
  bias = run[2]['stages'][0]['blocks']['mlp']['bias']
  assert np.abs(bias).max() > 0  # the loss-free bias moved, identically on both meshes


@pytest.mark.slow
@pytest.mark.parametrize(
  'fields',
  [
    {'execution': 'capacity'},
    {'router': 'expert_choice'},
    {'erc_weight': 1.0, 'shared_experts': 1},
  ],
  ids=['capacity', 'expert_choice', 'erc'],
)
def test_other_executions_expert_sharded_equal_unsharded(fields):
  ref = _run(_cfg(moe_topk, *REFERENCE, **fields))
  _compare(_run(_cfg(moe_topk, *EXPERT_MESHES[1], **fields)), ref)
