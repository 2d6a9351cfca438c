"""Golden sharding specs: the partition spec of every parameter, routing state and activation
constraint of each experiment's tiny model under each mesh preset, compared as text with one
golden file per preset, tests/golden/sharding_PRESET.txt.

This is how the default run checks sharding: it takes a second of tracing, no compilation. That
sharded runs compute what the unsharded run computes (values and gradients) is proven by the slow
tests in test_sharding.py, test_moe_sharding.py and test_uoe_model.py; a change here that is
intended is recorded with `UPDATE_GOLDEN=1 pytest tests/test_sharding_golden.py` and reviewed
as a diff of the golden file.
"""

import difflib
import inspect
import math
import os

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

from configs import moe_topk, routing_transformer, schema, sharding, tiny, uoe
from model import axes
from train import mesh as mesh_lib
from train.step import build_model

GOLDEN_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'golden')


def golden_path(preset: str) -> str:
  return os.path.join(GOLDEN_DIR, f'sharding_{preset}.txt')


CONFIGS = {
  'tiny': tiny,
  'moe_topk': moe_topk,
  'routing_transformer': routing_transformer,
  'uoe': uoe,
}
MESHES = {
  'dp': (8, 1, 1, 1),
  'fsdp': (2, 4, 1, 1),
  'fsdp_tp': (2, 2, 2, 1),
  'fsdp_ep': (1, 4, 1, 2),
}


def _config(name: str, preset: str) -> schema.Config:
  module = CONFIGS[name]
  c = module.get_config() if name == 'tiny' else module.get_config('tiny')
  c.mesh.shape, c.mesh.rules = MESHES[preset], preset
  return schema.load(c, math.prod(MESHES[preset]))


def _spec_text(spec) -> str:
  return '(' + ', '.join('None' if p is None else repr(p) for p in spec) + ')'


def _lines(name: str, preset: str) -> list[str]:
  """'name preset kind path shape -> spec' for every variable and every activation constraint."""
  cfg = _config(name, preset)
  mesh = mesh_lib.make_mesh(cfg.mesh, jax.devices()[: math.prod(MESHES[preset])])
  rules = sharding.rules(preset)
  model = nnx.eval_shape(lambda: build_model(cfg))
  state = nnx.state(model)
  shardings = axes.state_shardings(state, mesh, rules)
  out = []
  for (path, leaf), (_, shard) in zip(
    jax.tree_util.tree_leaves_with_path(state), jax.tree_util.tree_leaves_with_path(shardings)
  ):
    where = '/'.join(str(getattr(k, 'key', k)) for k in path).removesuffix('/.value')
    out.append(f'{name} {preset} var {where} {tuple(leaf.shape)} -> {_spec_text(shard.spec)}')
  seen, constrain = set(), axes.constrain

  def recording(x, names):
    caller = inspect.stack()[1]
    module = os.path.splitext(os.path.basename(caller.filename))[0]
    spec = axes.logical_to_spec(names, rules, mesh)
    line = (
      f'{name} {preset} act {module}.{caller.function} {tuple(names)} {tuple(x.shape)} '
      f'-> {_spec_text(spec)}'
    )
    if line not in seen:
      seen.add(line)
      out.append(line)
    return constrain(x, names)

  tokens = jax.ShapeDtypeStruct((cfg.train.batch_size, cfg.train.seq_len), jnp.int32)
  graph, params = nnx.split(model)
  axes.constrain = recording
  try:
    with axes.axis_rules(mesh, rules):
      jax.eval_shape(lambda p, t: nnx.merge(graph, p)(t), params, tokens)
  finally:
    axes.constrain = constrain
  return out


@pytest.mark.parametrize('preset', list(MESHES))
def test_sharding_specs_match_the_golden_file(preset):
  text = '\n'.join(line for name in CONFIGS for line in _lines(name, preset)) + '\n'
  golden_file = golden_path(preset)
  if os.environ.get('UPDATE_GOLDEN'):
    os.makedirs(GOLDEN_DIR, exist_ok=True)
    with open(golden_file, 'w') as f:
      f.write(text)
  with open(golden_file) as f:
    golden = f.read()
  if text != golden:
    diff = ''.join(
      difflib.unified_diff(golden.splitlines(True), text.splitlines(True), 'golden', 'now', n=0)
    )
    pytest.fail(
      f'sharding specs differ from {golden_file} (UPDATE_GOLDEN=1 records an intended '
      f'change):\n{diff[:6000]}'
    )


def test_golden_file_shards_what_each_preset_promises():
  """The golden file itself is meaningful: fsdp splits the embedding dimension of parameters,
  fsdp_tp splits heads and MLP over 'tensor', fsdp_ep splits experts, dp splits only batches."""
  lines = []
  for preset in MESHES:
    with open(golden_path(preset)) as f:
      lines += f.read().splitlines()
  by = lambda preset, kind: [l for l in lines if l.split()[1] == preset and l.split()[2] == kind]
  assert all("'fsdp'" not in l and "'tensor'" not in l for l in by('dp', 'var'))
  assert any("'fsdp'" in l for l in by('fsdp', 'var'))
  assert any("'tensor'" in l and '/wq ' in l for l in by('fsdp_tp', 'var'))
  assert any("'expert'" in l for l in by('fsdp_ep', 'var') if l.startswith('moe_topk'))
  batch_first = [l for l in by('fsdp', 'act') if "('batch'," in l]
  assert batch_first and all("-> (('data', 'fsdp')" in l for l in batch_first)
