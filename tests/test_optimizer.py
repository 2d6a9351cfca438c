"""Schedule, weight-decay mask, gradient accumulation, and checkpoint selection."""

import dataclasses
import os

import jax
import numpy as np
import pytest
from flax import nnx

from configs import schema, sharding, tiny
from train import mesh as mesh_lib
from train.checkpoint import Checkpointer
from train.optimizer import decay_mask, learning_rate_schedule
from train.step import build_model, make_step_fns


def _cfg(**train):
  cfg = schema.load(tiny.get_config(), 8)
  return dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, **train))


def test_schedule_warmup_peak_and_floor():
  opt = schema.OptimizerConfig(learning_rate=1.0, warmup_steps=10, min_lr_ratio=0.1)
  lr = learning_rate_schedule(opt, total_steps=110)
  assert float(lr(0)) == 0.0 and np.isclose(float(lr(5)), 0.5)
  assert np.isclose(float(lr(10)), 1.0)
  assert np.isclose(float(lr(110)), 0.1, atol=1e-6)
  assert all(float(lr(s)) >= float(lr(s + 1)) for s in range(10, 110))


def test_decay_mask_spares_norms():
  model = build_model(_cfg())
  mask = decay_mask(nnx.state(model, nnx.Param))
  flat = {jax.tree_util.keystr(p): v for p, v in jax.tree_util.tree_leaves_with_path(mask)}
  assert flat and all(not v for k, v in flat.items() if 'norm' in k)
  assert all(v for k, v in flat.items() if 'norm' not in k)  # matrices and the embedding
  assert any('embedding' in k for k, v in flat.items() if v)


def _one_step(cfg):
  fns = make_step_fns(cfg, mesh_lib.make_mesh(cfg.mesh), sharding.rules(cfg.mesh.rules))
  rng = np.random.default_rng(0)
  toks = rng.integers(0, 257, (cfg.train.batch_size, cfg.train.seq_len + 1), dtype=np.int32)
  batch = jax.device_put({'inputs': toks[:, :-1], 'targets': toks[:, 1:]}, fns.batch_sharding)
  state, metrics = fns.train_step(fns.init(), batch)
  return jax.device_get(nnx.to_pure_dict(state['model'])), jax.device_get(metrics)


@pytest.mark.slow  # ~15 s: two step compilations (one and four microbatches)
def test_gradient_accumulation_equals_one_big_batch():
  cfg = _cfg(batch_size=16)
  params_1, metrics_1 = _one_step(cfg)
  params_4, metrics_4 = _one_step(
    dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, grad_accum=2))
  )
  np.testing.assert_allclose(metrics_4['loss'], metrics_1['loss'], rtol=1e-6)
  np.testing.assert_allclose(metrics_4['grad_norm'], metrics_1['grad_norm'], rtol=1e-5)
  jax.tree.map(
    lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), params_4, params_1
  )


def test_half_written_checkpoint_is_never_chosen(tmp_path):
  cfg = _cfg()
  fns = make_step_fns(cfg, mesh_lib.make_mesh(cfg.mesh), sharding.rules(cfg.mesh.rules))
  ckpt = Checkpointer(str(tmp_path), cfg.checkpoint)
  ckpt.save(3, fns.init())
  ckpt.close()
  # What a crash during the save of step 7 leaves: Orbax's temporary directory, never renamed.
  os.makedirs(tmp_path / 'checkpoints' / '7.orbax-checkpoint-tmp-1234' / 'model')
  reopened = Checkpointer(str(tmp_path), cfg.checkpoint)
  assert reopened.latest_step() == 3 and reopened.all_steps() == [3]
  restored = reopened.restore(3, fns.abstract_state())
  assert jax.tree.structure(restored) == jax.tree.structure(fns.abstract_state())
