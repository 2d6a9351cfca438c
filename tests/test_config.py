"""Config loading, conversion to frozen dataclasses, and each validation error."""

import dataclasses
import glob
import importlib.util
import os
import subprocess
import sys

import pytest

from configs import base, schema, tiny
from model.config import ConfigError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _experiment_files():
  return sorted(
    p
    for p in glob.glob(os.path.join(ROOT, 'configs', '*.py'))
    if os.path.basename(p)
    not in (
      '__init__.py',
      'schema.py',
      'sharding.py',
      'cli.py',
      'sweeps.py',
      'from_run.py',
      'model_checks.py',
    )
  )


def _load_module(path):
  spec = importlib.util.spec_from_file_location(os.path.basename(path)[:-3], path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


@pytest.mark.parametrize('path', _experiment_files(), ids=os.path.basename)
def test_every_experiment_loads_full_and_tiny(path):
  module = _load_module(path)
  assert module.__doc__ and 'Usage:' in module.__doc__ and 'Hardware:' in module.__doc__
  schema.load(module.get_config(None), num_devices=8 if path.endswith('base.py') else 1)
  cfg = schema.load(module.get_config('tiny'), num_devices=8)
  assert cfg.model.d_model <= 128 and cfg.train.steps <= 50


def test_frozen_and_round_trips_through_dict():
  cfg = schema.load(tiny.get_config(), 8)
  with pytest.raises(dataclasses.FrozenInstanceError):
    cfg.train.steps = 3  # type: ignore[misc]
  assert schema.from_dict(cfg.to_dict()) == cfg
  assert cfg.attention is cfg.model.attention


def _with(**overrides):
  """The tiny config as a plain dict (as config.json is read) with `group__field` overrides."""
  c = tiny.get_config().to_dict()
  for path, value in overrides.items():
    group, field = path.split('__')
    c[group][field] = value
  return c


@pytest.mark.parametrize(
  'overrides, field',
  [
    ({'model__num_heads': 3}, 'model.num_heads'),
    ({'model__num_kv_heads': 3}, 'model.num_kv_heads'),
    ({'model__remat': 'sometimes'}, 'model.remat'),
    ({'model__dtype': 'int8'}, 'model.dtype'),
    ({'train__batch_size': 12}, 'train.batch_size'),
    ({'train__steps': 0}, 'train.steps'),
    ({'optimizer__warmup_steps': 100}, 'optimizer.warmup_steps'),
    ({'optimizer__decay': 'step'}, 'optimizer.decay'),
    ({'mesh__shape': (16, 1, 1, 1)}, 'mesh.shape'),
    ({'mesh__shape': (3, -1, 1, 1)}, 'mesh.shape'),
    ({'mesh__shape': (-1, -1, 1, 1)}, 'mesh.shape'),
    ({'mesh__rules': 'zero3'}, 'mesh.rules'),
    ({'mesh__shape': (1, 1, 8, 1), 'mesh__rules': 'fsdp_tp'}, 'model.num_heads'),
    ({'data__heldout_fraction': 1.5}, 'data.heldout_fraction'),
    ({'attention__kind': 'routing', 'attention__qk_norm': True}, 'attention.qk_norm'),
    ({'uoe__attention': 'smha', 'attention__qk_norm': True}, 'attention.qk_norm'),
    ({'train__init_from_mode': 'graft'}, 'train.init_from_mode'),
    ({'attention__impl': 'flash'}, 'attention.impl'),
    ({'moe__num_experts': -1}, 'moe.num_experts'),
    ({'moe__num_experts': 4, 'moe__top_k': 5}, 'moe.top_k'),
    ({'moe__num_experts': 4, 'moe__capacity_factor': 0.0}, 'moe.capacity_factor'),
    ({'moe__num_experts': 4, 'moe__router': 'hash'}, 'moe.router'),
    (
      {'moe__num_experts': 6, 'mesh__shape': (1, 2, 1, 4), 'mesh__rules': 'fsdp_ep'},
      'moe.num_experts',
    ),
    ({'train__steps': 'ten'}, 'train.steps'),
    ({'model__scan_layers': 1}, 'model.scan_layers'),
    # nan passes every range check (`nan < 0` is False): refused as not finite, naming the field
    ({'optimizer__learning_rate': float('nan')}, 'optimizer.learning_rate=nan'),
    ({'optimizer__learning_rate': float('inf')}, 'optimizer.learning_rate=inf'),
    ({'optimizer__weight_decay': float('nan')}, 'optimizer.weight_decay=nan'),
    ({'optimizer__grad_clip': float('nan')}, 'optimizer.grad_clip=nan'),
    ({'optimizer__b2': float('nan')}, 'optimizer.b2=nan'),
    ({'optimizer__eps': -1}, 'optimizer.eps=-1'),
    ({'optimizer__grad_clip': -1.0}, 'optimizer.grad_clip=-1'),
    ({'model__init_std': float('inf')}, 'model.init_std=inf'),
    ({'model__norm_eps': 0.0}, 'model.norm_eps=0'),
    ({'moe__num_experts': 4, 'moe__jitter': float('nan')}, 'moe.jitter=nan'),
    ({'attention__commitment_weight': float('-inf')}, 'attention.commitment_weight=-inf'),
    ({'entropy__beta_tok': float('nan')}, 'entropy.beta_tok=nan'),
    ({'uoe__head_capacity': float('inf')}, 'uoe.head_capacity=inf'),
    ({'data__heldout_fraction': float('nan')}, 'data.heldout_fraction=nan'),
    ({'train__peak_tflops': float('nan')}, 'train.peak_tflops=nan'),
    ({'data__seed': -1}, 'data.seed=-1'),
    ({'train__seed': -1}, 'train.seed=-1'),
    ({'train__on_nonfinite': 'ignore'}, 'train.on_nonfinite'),
    ({'train__nonfinite_patience': 0}, 'train.nonfinite_patience=0'),
  ],
)
def test_validation_names_the_field(overrides, field):
  with pytest.raises(ConfigError) as e:
    schema.load(_with(**overrides), num_devices=8)
  message = str(e.value)
  assert field in message and '\n' not in message


def test_unknown_field_in_experiment_file():
  c = tiny.get_config()
  c.unlock()
  c.train.stepz = 5
  with pytest.raises(ConfigError, match=r'train\.stepz: unknown field'):
    schema.load(c, 8)


def test_int_accepted_for_float_and_mesh_minus_one_resolves():
  cfg = schema.load(_with(optimizer__learning_rate=1), 8)
  assert cfg.optimizer.learning_rate == 1.0 and isinstance(cfg.optimizer.learning_rate, float)
  mesh = schema.load(_with(mesh__shape=(2, -1, 1, 1)), 8).mesh
  assert mesh.resolved_shape(8) == (2, 4, 1, 1)


def test_base_defaults_are_the_dataclass_defaults():
  """configs/base.py is the single source of defaults: the dataclasses must agree with it."""
  cfg = schema.load(base.get_config(), 8)
  for group in (cfg.model, cfg.data, cfg.optimizer, cfg.train, cfg.checkpoint, cfg.mesh, cfg.eval):
    assert group == type(group)(), type(group).__name__


def _run_train(tmp_path, *extra):
  workdir = tmp_path / 'run'
  env = dict(os.environ, JAX_PLATFORMS='cpu')
  proc = subprocess.run(
    [
      sys.executable,
      '-m',
      'train.train',
      '--config=configs/tiny.py',
      f'--workdir={workdir}',
      *extra,
    ],
    cwd=ROOT,
    env=env,
    capture_output=True,
    text=True,
    timeout=120,
  )
  return proc, workdir


@pytest.mark.parametrize(
  'flag, expected',
  [
    (
      '--config.train.stepz=5',
      "--config.train.stepz: no such config field (did you mean 'steps'?)",
    ),
    ('--config.train.steps=abc', '--config.train.steps=abc'),
    ('--config.model.num_heads=3', 'model.num_heads=3 must divide model.d_model=64'),
    ('--config.mesh.shape=(4,4,1,1)', 'mesh.shape=(4, 4, 1, 1) needs 16 devices'),
    (
      '--config.optimizer.learning_rate=nan',
      'optimizer.learning_rate=nan: expected a finite number',
    ),
    ('--config.data.seed=-1', 'data.seed=-1: expected a value >= 0'),
  ],
)
def test_cli_errors_are_one_line_and_start_nothing(tmp_path, flag, expected):
  proc, workdir = _run_train(tmp_path, flag)
  _assert_one_line_error(proc, workdir, expected)


def _assert_one_line_error(proc, workdir, expected):
  assert proc.returncode != 0
  lines = [line for line in proc.stderr.splitlines() if line.startswith('error:')]
  assert len(lines) == 1 and expected in lines[0], proc.stderr
  assert 'Traceback' not in proc.stderr
  assert not workdir.exists()


@pytest.mark.parametrize('path', _experiment_files(), ids=os.path.basename)
def test_unknown_variant_lists_the_accepted_ones(path):
  with pytest.raises(
    ValueError,
    match=r"configs/\w+\.py: unknown variant 'tinny'; expected one "
    r'of: tiny',
  ):
    _load_module(path).get_config('tinny')


def test_cli_unknown_variant_is_one_line(tmp_path):
  workdir = tmp_path / 'run'
  proc = subprocess.run(
    [sys.executable, '-m', 'train.train', '--config=configs/demo.py:tinny', f'--workdir={workdir}'],
    cwd=ROOT,
    env=dict(os.environ, JAX_PLATFORMS='cpu'),
    capture_output=True,
    text=True,
    timeout=120,
  )
  _assert_one_line_error(
    proc, workdir, "configs/demo.py: unknown variant 'tinny'; expected one of: tiny, dense"
  )
