"""Warm starts (`train.init_from`, train/warm_start.py): copy, sparse upcycling, dense -> UoE."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs import base, moe_topk, schema, uoe
from model.config import ConfigError
from model.transformer import Transformer
from tests.tiny_runs import metrics_rows, weights_only_run
from train import warm_start
from train.restore import restore_model
from train.step import lm_loss


@pytest.fixture(scope='module')
def dense_run(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp('dense'))
  weights_only_run(workdir, base.get_config('tiny'), seed=3)
  return workdir


def _target(module, dense_run, mode, **model):
  c = module.get_config('tiny')
  c.model.update(**model)
  c.train.update(init_from=dense_run, init_from_mode=mode)
  return schema.load(c, 1)


def _model(cfg: schema.Config, model_state: dict) -> Transformer:
  """The model of `cfg` holding `model_state` (built abstractly: no random initialisation)."""
  graphdef, state = nnx.split(nnx.eval_shape(lambda: Transformer(cfg.model, rngs=nnx.Rngs(0))))
  nnx.replace_by_pure_dict(state, jax.tree.map(jnp.asarray, model_state))
  model = nnx.merge(graphdef, state)
  model.eval()
  return model


@nnx.jit
def _jitted_loss(model, tokens):
  logits, _ = model(tokens[:, :-1])
  return lm_loss(logits, tokens[:, 1:])


def _loss(model, tokens) -> float:
  return float(_jitted_loss(model, tokens))


TOKENS = jax.random.randint(jax.random.key(0), (4, 65), 0, 257)


def test_copy_is_the_source_model(dense_run):
  cfg = _target(base, dense_run, 'copy')
  state = warm_start.load(cfg)
  source = nnx.to_pure_dict(nnx.state(restore_model(dense_run).model))
  jax.tree.map(np.testing.assert_array_equal, state, jax.tree.map(np.asarray, source))
  no_scan = _target(base, dense_run, 'copy', scan_layers=False)  # layers regrouped, same values
  looped = _model(no_scan, warm_start.load(no_scan))
  assert _loss(looped, TOKENS) == pytest.approx(_loss(_model(cfg, state), TOKENS), abs=1e-6)


def test_upcycled_model_with_a_uniform_router_is_the_dense_model(dense_run):
  cfg = _target(moe_topk, dense_run, 'upcycle', mlp_dim=128)
  cfg = dataclasses.replace(
    cfg, model=dataclasses.replace(cfg.model, moe=dataclasses.replace(cfg.model.moe, expert_dim=0))
  )
  state = warm_start.load(cfg)
  dense = restore_model(dense_run)
  mlp = jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(dense.model)))['stages'][0]['blocks']
  experts = state['stages'][0]['blocks']['mlp']
  for e in range(cfg.model.moe.num_experts):  # [layers, E, D, F]: every expert a copy
    np.testing.assert_array_equal(experts['w_gate'][:, e], mlp['mlp']['w_gate'])
  assert np.abs(experts['router']).max() > 0  # the router keeps this run's initialisation
  dense_loss = _loss(dense.model, TOKENS)
  # renormalised top-k weights sum to 1 over identical experts: the dense model, whatever the router
  assert _loss(_model(cfg, state), TOKENS) == pytest.approx(dense_loss, abs=1e-6)
  experts['router'] = np.zeros_like(experts['router'])  # a uniform router too
  assert _loss(_model(cfg, state), TOKENS) == pytest.approx(dense_loss, abs=1e-6)
  experts['w_up'] = np.array(experts['w_up'])
  experts['w_up'][:, 0] *= 2.0  # the test can fail: a changed expert changes the loss
  assert _loss(_model(cfg, state), TOKENS) != pytest.approx(dense_loss, abs=1e-6)


def test_dense_to_uoe_at_full_capacity_is_exact(dense_run):
  cfg = _target(uoe, dense_run, 'uoe')
  u = dataclasses.replace(
    cfg.model.uoe, heads_per_token=cfg.model.num_heads, experts_per_token=cfg.model.uoe.num_experts
  )
  cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, uoe=u))
  converted = _model(cfg, warm_start.load(cfg))
  dense = restore_model(dense_run).model
  np.testing.assert_allclose(converted(TOKENS)[0], dense(TOKENS)[0], atol=2e-5, rtol=1e-5)


def test_bad_init_from_is_one_line(dense_run, tmp_path):
  def refused(cfg, match):
    with pytest.raises(ConfigError, match=match) as e:
      warm_start.load(cfg)
    assert '\n' not in str(e.value)

  refused(_target(base, dense_run, 'copy', d_model=32), r'does not fit this model in \d+ arrays')
  refused(_target(base, dense_run + '@7', 'copy'), r'--step=7: no checkpoint at that step')
  refused(_target(base, str(tmp_path / 'none'), 'copy'), 'config.json not found')
  refused(_target(moe_topk, dense_run, 'upcycle'), 'set moe.expert_dim to it')
  refused(_target(base, dense_run + '@x', 'copy'), 'expected DIR or DIR@STEP')
  with pytest.raises(ConfigError, match="train.init_from_mode='graft': expected one of"):
    c = base.get_config('tiny')
    c.train.init_from_mode = 'graft'
    schema.load(c, 1)


@pytest.mark.slow  # three short trainings; warm_start.load and place are tested above
def test_training_starts_from_the_source_and_resumes_its_own_checkpoint(dense_run, tmp_path):
  from train.train import train_and_evaluate  # pylint: disable=g-import-not-at-top

  c = base.get_config('tiny')
  c.data.cache_dir = str(tmp_path / 'corpus')
  c.train.update(init_from=dense_run, steps=3, log_every=1)
  c.optimizer.warmup_steps = 1
  cfg = schema.load(c, jax.device_count())
  workdir = str(tmp_path / 'warm')
  first = train_and_evaluate(cfg, workdir)
  assert first['step'] == 3 and np.isfinite(first['loss'])
  # the source is the fresh model of train.seed=3: training from it equals training that model
  same = dataclasses.replace(cfg.train, init_from='', seed=3)
  fresh = train_and_evaluate(dataclasses.replace(cfg, train=same), str(tmp_path / 'fresh'))
  warm_rows, fresh_rows = metrics_rows(workdir), metrics_rows(tmp_path / 'fresh')
  assert [r['loss'] for r in warm_rows] == [r['loss'] for r in fresh_rows] and fresh['step'] == 3
  later = dataclasses.replace(
    cfg, train=dataclasses.replace(cfg.train, steps=4, init_from='/nowhere')
  )
  assert train_and_evaluate(later, workdir)['step'] == 4  # resumes; init_from is not read again


def test_place_puts_the_model_on_the_fresh_state_shardings(dense_run):
  from configs import sharding  # pylint: disable=g-import-not-at-top
  from train import mesh as mesh_lib  # pylint: disable=g-import-not-at-top
  from train.step import make_step_fns  # pylint: disable=g-import-not-at-top

  c = base.get_config('tiny')
  c.train.update(init_from=dense_run)
  c.mesh.update(shape=(2, 4, 1, 1), rules='fsdp')
  cfg = schema.load(c, jax.device_count())
  fns = make_step_fns(cfg, mesh_lib.make_mesh(cfg.mesh), sharding.rules(cfg.mesh.rules))
  fresh = fns.init()
  shardings = jax.tree.leaves(jax.tree.map(lambda a: a.sharding, nnx.to_pure_dict(fresh['model'])))
  model_state = warm_start.load(cfg)
  placed = jax.tree.leaves(nnx.to_pure_dict(warm_start.place(fresh, model_state)['model']))
  for array, sharding_, value in zip(placed, shardings, jax.tree.leaves(model_state), strict=True):
    assert array.sharding == sharding_
    np.testing.assert_array_equal(array, value)
  assert any(len(s.device_set) > 1 for s in shardings)  # really sharded
