"""`python -m train.plan`: the real train step compiled ahead of time for a topology, never run.

The per-device state bytes XLA assigns equal an independent count from the sharded shapes; a
config that does not fit is a result (exit status 3), and `fit` then finds one that does.
TPU topologies need libtpu (the `tpu` extra); those tests are skipped where it has no wheel.
"""

import dataclasses
import importlib.util
import json
import math
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from configs import moe_topk, schema, tiny
from model import plan as layer_plan
from model.config import ConfigError
from train import aot, plan, topology

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
needs_libtpu = pytest.mark.skipif(
  importlib.util.find_spec('libtpu') is None, reason='libtpu (the tpu extra) is not installed'
)


def _tiny(rules='fsdp', **train):
  c = tiny.get_config()
  c.mesh.shape, c.mesh.rules = (1, -1, 1, 1), rules
  for k, v in train.items():
    c.train[k] = v
  return c


def _independent_state_bytes(cfg, topo) -> int:
  """Parameters and optimizer state per device from the shapes and partition specs alone."""
  report_mesh = dict(
    zip(('data', 'fsdp', 'tensor', 'expert'), cfg.mesh.resolved_shape(len(topo.devices)))
  )
  fns, _ = aot.step_fns(cfg, topo)
  total = 0
  for leaf in jax.tree.leaves(fns.abstract_state()):
    shape = list(leaf.shape)
    for i, part in enumerate(leaf.sharding.spec):
      for axis in (part,) if isinstance(part, str) else (part or ()):
        shape[i] = -(-shape[i] // report_mesh[axis])
    total += math.prod(shape) * np.dtype(leaf.dtype).itemsize
  return total


def test_tiny_on_cpu8_state_bytes_flops_and_collectives():
  topo = topology.devices_for('cpu:8')
  cfg = aot.load(_tiny(), topo)
  report = aot.analyse(cfg, topo)
  m = report['memory_per_device']
  state = _independent_state_bytes(cfg, topo)
  assert m['params'] + m['optimizer'] == state
  assert m['xla_arguments'] == state + m['batch']  # XLA's own buffer sizes, no padding on CPU
  assert m['fits'] and m['total'] >= m['xla_arguments'] + m['xla_temporaries'] - m['xla_aliased']
  flops = report['flops_per_step']
  assert flops['comparable'] and 0.9 < flops['xla_over_model'] < 1.15  # docs/scaling.md
  coll = report['collectives_per_step']
  assert (
    coll['all-gather']['count'] > 0
    and coll['reduce-scatter']['count'] + coll['all-reduce']['count'] > 0
  )
  assert any("'fsdp'" in line for line in report['parameters'])
  assert 'not a measurement' not in json.dumps(report['estimate'])  # no chip, no estimate


@needs_libtpu
def test_tiny_on_v5e_2x2_compiles_the_tpu_kernels_and_fits():
  topo = topology.devices_for('v5e:2x2')
  cfg = aot.load(_tiny(), topo)
  report = aot.analyse(cfg, topo)
  m = report['memory_per_device']
  assert report['device_kind'].startswith('TPU v5')
  assert m['capacity'] == 16 << 30 and m['fits']
  # TPU tiles pad small arrays: XLA's argument bytes are at least the unpadded count
  assert m['xla_arguments'] >= _independent_state_bytes(cfg, topo) + m['batch']
  assert report['estimate']['kind'].endswith('not a measurement')
  e = report['estimate']
  assert 0 < e['mfu_no_overlap'] <= e['mfu_upper_bound'] <= 1


@needs_libtpu
def test_a_step_the_tpu_compiler_refuses_does_not_fit():
  """XLA:TPU refuses to compile a step beyond its HBM: the plan reports its numbers."""
  topo = topology.devices_for('v5e:2x2')
  c = _tiny(rules='dp', batch_size=4096, seq_len=4096)
  report = aot.analyse(aot.load(c, topo), topo)
  m = report['memory_per_device']
  assert not m['fits'] and m['total'] > m['capacity'] > 15 << 30
  assert report['compiler_message'].startswith('RESOURCE_EXHAUSTED')
  assert 'does not fit: ' in aot.describe(report)


def test_a_config_that_does_not_fit_is_reported_and_fit_finds_one(capsys):
  """A topology whose chip holds 4 MiB: the tiny step at 4 rows per device does not fit."""
  base = topology.devices_for('cpu:8')
  small = topology.Chip('test chip', 4 << 20, 1e12, 1e11, 1e10, 1, 'a test')
  topo = dataclasses.replace(base, chip=small)
  cfg = aot.load(_tiny(rules='dp', batch_size=32), topo)
  report = aot.analyse(cfg, topo)
  assert not report['memory_per_device']['fits']
  rows = plan.fit(cfg, topo, remats=('none',), accums=(1,), max_per_device=8, log=lambda s: None)
  assert len(rows) == 1 and rows[0].fits and rows[0].per_device < 4
  assert rows[0].total <= small.hbm_bytes
  assert 'largest global batch that fits: ' + str(rows[0].global_batch) in plan.describe_fit(rows)


@pytest.mark.parametrize(
  'name, message',
  [
    ('v7x:2x2', "--topology='v7x:2x2': expected one of the forms cpu:N, v4:AxBxC"),
    ('v5e:2x2x2', "--topology='v5e:2x2x2': expected one of the forms"),
    ('cpu:64', '--topology=cpu:64: this process has 8 CPU devices'),
  ],
)
def test_bad_topologies_are_refused_in_one_line(name, message):
  with pytest.raises(ConfigError, match='^' + message.replace('(', r'\(')) as err:
    topology.devices_for(name)
  assert '\n' not in str(err.value)


def test_missing_libtpu_names_the_extra(monkeypatch):
  real = importlib.util.find_spec
  monkeypatch.setattr(
    importlib.util, 'find_spec', lambda name, *a: None if name == 'libtpu' else real(name, *a)
  )
  with pytest.raises(
    ConfigError, match=r"TPU topologies need libtpu's compiler; install the tpu extra"
  ):
    topology.devices_for('v5p:4x4x4')


def _cli(*args):
  env = dict(os.environ, JAX_PLATFORMS='cpu')
  return subprocess.run(
    [sys.executable, '-m', 'train.plan', *args], cwd=ROOT, env=env, capture_output=True, text=True
  )


def test_cli_exit_statuses(tmp_path):
  """Does not fit: status 3 and one line on stderr; a mesh that does not divide the devices and
  an unknown override: one line each."""
  out = tmp_path / 'plan.json'
  big = _cli(
    '--config=configs/tiny.py', '--topology=cpu:2', '--config.train.batch_size=131072',
    '--config.mesh.rules=dp', f'--out={out}',
  )  # fmt: skip
  assert big.returncode == plan.DOES_NOT_FIT, big.stderr[-2000:]
  assert big.stderr.strip().splitlines()[-1].startswith('does not fit: ')
  assert json.loads(out.read_text())['memory_per_device']['fits'] is False
  mesh = _cli('--config=configs/tiny.py', '--topology=cpu:3', '--config.mesh.shape=(2,-1,1,1)')
  assert mesh.returncode == 1 and mesh.stderr.strip().startswith('error: mesh.shape')
  assert len(mesh.stderr.strip().splitlines()) == 1
  field = _cli('--config=configs/tiny.py', '--topology=cpu:2', '--config.train.nope=1')
  assert field.returncode == 2 and 'no such config field' in field.stderr


@pytest.mark.parametrize('name', ['base', 'moe_topk', 'moe_erc', 'routing_transformer', 'uoe'])
def test_the_1b_variants_are_about_a_billion_parameters(name):
  """The flagship configs at pod-slice scale (docs/scaling.md), loaded for a v5p-64's devices."""
  module = importlib.import_module(f'configs.{name}')
  cfg = schema.load(module.get_config('1b'), 64)
  built = layer_plan.build(cfg.model, cfg.train.seq_len)
  assert 0.9e9 < built.params < 1.8e9 and 0.5e9 < built.active_params < 1.1e9  # UoE: half
  assert cfg.model.dtype == 'bfloat16' and cfg.train.seq_len == (
    8192 if 'routing' in name else 2048
  )


@pytest.mark.slow  # one to three minutes each on 2 cores
@needs_libtpu
@pytest.mark.parametrize(
  'config, topo', [('base.py:1b', 'v5p:4x4x4'), ('moe_erc.py:1b', 'v5e:16x16')]
)
def test_flagship_plans(config, topo, tmp_path):
  out = tmp_path / 'plan.json'
  run = _cli(f'--config=configs/{config}', f'--topology={topo}', f'--out={out}')
  assert run.returncode in (0, plan.DOES_NOT_FIT), run.stderr[-3000:]
  report = json.loads(out.read_text())
  assert report['devices'] == (64 if topo.startswith('v5p') else 256)
  if config.startswith('base'):
    assert report['memory_per_device']['fits']
    assert 0.9 < report['flops_per_step']['xla_over_model'] < 1.15
  counts = [v['count'] for v in report['collectives_per_step'].values()]
  assert sum(counts) > 0 and report['collective_loops_unknown'] == 0


@needs_libtpu
def test_commands_leave_the_absent_tpu_runtime_out():
  """With libtpu installed on a machine without TPU chips, the commands start jax on the CPU
  alone instead of a TPU runtime that prints warnings and finds nothing (configs/cli.py)."""
  env = {k: v for k, v in os.environ.items() if k != 'JAX_PLATFORMS'}
  code = (
    'from configs import cli; cli.leave_out_absent_tpu(); import jax; '
    'print(jax.config.jax_platforms, jax.default_backend())'
  )
  run = subprocess.run(
    [sys.executable, '-c', code], cwd=ROOT, env=env, capture_output=True, text=True
  )
  assert run.stdout.split() == ['cpu', 'cpu'], run.stderr[-2000:]
  assert 'TPU_ACCELERATOR_TYPE' not in run.stderr


def test_fit_points_trade_fsdp_for_the_expert_axis():
  """The mesh and batch of each --fit point, without compiling: the expert axis takes its
  devices from fsdp, the batch covers every data-like axis, and an impossible size is skipped."""
  topo = topology.devices_for('cpu:8')
  c = moe_topk.get_config('tiny')
  c.mesh.shape, c.mesh.rules = (1, -1, 1, 1), 'fsdp'
  cfg = aot.load(c, topo)
  four = plan._with(cfg, 'full', 4, 2, 3, topo)
  assert four.mesh.shape == (1, 2, 1, 4) and four.mesh.rules == 'fsdp_ep'
  assert (four.train.batch_size, four.train.grad_accum, four.model.remat) == (3 * 8 * 2, 2, 'full')
  assert plan._with(cfg, 'none', 1, 1, 1, topo).mesh.shape == (1, 8, 1, 1)
  assert plan._with(cfg, 'none', 16, 1, 1, topo) is None


@pytest.mark.slow  # one compilation per expert-parallel size (~30 s)
def test_fit_searches_the_expert_parallel_size_of_moe_configs():
  topo = topology.devices_for('cpu:8')
  c = moe_topk.get_config('tiny')
  c.mesh.shape, c.mesh.rules = (1, -1, 1, 1), 'fsdp'
  cfg = aot.load(c, topo)
  rows = plan.fit(cfg, topo, remats=('full',), accums=(1,), max_per_device=1, log=lambda s: None)
  eps = [e for e in (1, 2, 4, 8) if cfg.moe.num_experts % e == 0]
  assert [r.expert_parallel for r in rows] == eps and all(r.fits for r in rows)
  assert all(r.global_batch == 8 for r in rows)  # one row per device: the batch spans every axis
