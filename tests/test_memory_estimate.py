"""train/memory.py: exact state bytes, an activation bound that XLA's own accounting confirms, and a
refusal of an impossible config before anything is allocated or compiled."""

import time

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

from configs import schema, sharding, tiny
from configs.schema import ConfigError
from model import plan
from train import memory
from train import mesh as mesh_lib
from train.optimizer import make_optimizer
from train.step import build_model, make_step_fns


def _cfg(num_devices: int = 1, **model):
  """The tiny dense config (f32, 2 layers, batch 8 x 64 tokens), with `model` fields changed;
  `train.*` keys go to the train group."""
  c = tiny.get_config()
  c.train.update({k[len('train_') :]: model.pop(k) for k in list(model) if k.startswith('train_')})
  c.model.update(model)
  return schema.load(c, num_devices)


def _bytes(tree) -> int:
  return sum(x.nbytes for x in jax.tree.leaves(tree))


def test_state_bytes_equal_the_real_model_and_optimizer():
  cfg = _cfg()
  est = memory.estimate(cfg, 1)
  model = build_model(cfg)
  opt = nnx.Optimizer(model, make_optimizer(cfg.optimizer, cfg.train.steps), wrt=nnx.Param)
  assert est.params == _bytes(nnx.state(model)) == 4 * plan.build(cfg.model).params
  assert est.gradients == _bytes(nnx.state(model, nnx.Param))
  assert est.optimizer == _bytes(nnx.state(opt))
  assert est.optimizer > 2 * est.gradients  # AdamW: two moments plus the step count


@pytest.mark.parametrize('remat', ['none', pytest.param('full', marks=pytest.mark.slow)])
def test_estimate_is_below_what_xla_allocates_for_the_train_step(remat):
  cfg = _cfg(remat=remat)
  est = memory.estimate(cfg, 1)
  mesh = mesh_lib.make_mesh(cfg.mesh, jax.devices()[:1])
  fns = make_step_fns(cfg, mesh, sharding.rules(cfg.mesh.rules))
  b, l = cfg.train.batch_size, cfg.train.seq_len
  batch = {
    k: jax.ShapeDtypeStruct((b, l), jnp.int32, sharding=fns.batch_sharding)
    for k in ('inputs', 'targets')
  }
  stats = fns.train_step.lower(fns.abstract_state(), batch).compile().memory_analysis()
  if stats is None:
    pytest.skip('memory_analysis() is not available on this backend')
  batch_bytes = 2 * b * l * 4
  assert stats.argument_size_in_bytes == est.params + est.optimizer + batch_bytes
  # The donated state's outputs alias its arguments: count those bytes once.
  xla_bytes = (
    stats.argument_size_in_bytes
    + stats.output_size_in_bytes
    - stats.alias_size_in_bytes
    + stats.temp_size_in_bytes
  )
  assert est.total <= xla_bytes, (est.describe(), xla_bytes)


def test_activations_follow_remat_and_batch():
  none, full = (memory.activation_bytes(_cfg(remat=r)) for r in ('none', 'full'))
  dots, no_batch = (
    memory.activation_bytes(_cfg(remat=r)) for r in ('save_dots', 'save_dots_no_batch')
  )
  assert full < no_batch < dots <= none
  assert memory.activation_bytes(_cfg(train_batch_size=16)) == 2 * none
  # Activations are per micro-batch; the accumulated gradient then lives alongside them.
  accum = _cfg(train_grad_accum=2)
  assert 2 * memory.activation_bytes(accum) == none
  est = memory.estimate(accum, 1)
  assert est.overlap and est.total == est.params + est.optimizer + est.gradients + est.activations
  est = memory.estimate(_cfg(), 1)
  assert not est.overlap
  assert est.total == est.params + est.optimizer + max(est.gradients, est.activations)


def test_a_tiny_config_passes_and_the_device_memory_is_known():
  limit_bytes, source = memory.device_memory()
  assert limit_bytes > 1 << 30 and source
  est = memory.check(_cfg(8), 8)
  assert est is not None and est.per_device * 8 >= est.total


def test_a_huge_model_is_refused_before_anything_is_allocated():
  cfg = _cfg(8, d_model=1 << 16, num_heads=64, num_kv_heads=64, mlp_dim=4 << 16, num_layers=64)
  live_before = sum(a.nbytes for a in jax.live_arrays())
  start = time.perf_counter()
  with pytest.raises(ConfigError) as err:
    memory.check(cfg, 8)
  seconds = time.perf_counter() - start
  message = str(err.value)
  assert 'train.check_memory=False' in message and 'GiB' in message, message
  assert 'model.d_model=65536' in message and 'train.batch_size=8' in message, message
  assert '\n' not in message
  assert seconds < 1.0, seconds
  assert sum(a.nbytes for a in jax.live_arrays()) - live_before < 1 << 20

  unchecked = schema.from_dict(
    {**cfg.to_dict(), 'train': {**cfg.to_dict()['train'], 'check_memory': False}}
  )
  assert memory.check(unchecked, 8) is None
