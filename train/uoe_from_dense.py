"""`python -m train.uoe_from_dense --dense_workdir=DIR --config=configs/uoe.py --workdir=NEW
[--step=N] [--config.a.b=value ...]`: start a Union-of-Experts run from a dense run's checkpoint.

The dense model's weights are split into head- and MLP-experts by the exact decomposition
(`model.uoe_convert.convert_dense_state`; the gates start uniform), written as step 0 of NEW with a fresh
optimizer state, the dense run's dataset and NEW/config.json = `--config` with its overrides. Then
`python -m train.train --config=<the same config and overrides> --workdir=NEW` trains it from
there (the data order starts from the beginning). `--config` must describe the dense run's
architecture plus `uoe.*` (every other model field equal): the tool names the first that differs.

With every head and expert at full capacity and `uoe.gate_outputs=True` the converted model's
logits equal the dense model's (f32 rounding); the tool reports the largest difference on a few
held-out windows (`max_logit_change`), and states whether the config is at full capacity.
"""

import dataclasses
import json
import sys

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from flax import nnx
from ml_collections import config_flags

from configs import cli, schema, sharding
from data import corpus, pipeline, storage
from model import uoe_convert
from model.config import ConfigError
from train import mesh as mesh_lib
from train import restore
from train.checkpoint import Checkpointer
from train.step import make_step_fns


def _one_device(cfg: schema.Config) -> schema.Config:
  return dataclasses.replace(cfg, mesh=schema.MeshConfig(shape=(1, 1, 1, 1), rules='dp'))


def _check_architecture(dense: schema.Config, target: schema.Config) -> None:
  if dense.model.uoe.attention != 'dense' or dense.model.uoe.feed_forward != 'mlp':
    raise ConfigError(
      '--dense_workdir is already a UoE run (uoe.attention or uoe.feed_forward '
      'set); convert a dense run'
    )
  want = dataclasses.asdict(uoe_convert.dense_config(target.model))
  have = dataclasses.asdict(dense.model)
  for key, value in want.items():
    if key != 'uoe' and have.get(key) != value:
      raise ConfigError(
        f"--config model.{key}={value!r} differs from the dense run's "
        f'{have.get(key)!r}: the conversion keeps the architecture'
      )
  if not (target.model.uoe.attention == 'smha' or target.model.uoe.feed_forward == 'uome'):
    raise ConfigError('--config has no UoE layer (uoe.attention=smha or uoe.feed_forward=uome)')


def full_capacity(cfg) -> bool:
  """Every head and expert takes every token, and gates weigh outputs by E·g (= 1 when uniform)."""
  u, h = cfg.uoe, cfg.num_heads
  return (
    u.gate_outputs
    and u.resolved_heads_per_token(h) == h
    and u.head_capacity >= 1
    and u.experts_per_token == u.num_experts
    and (u.paradigm == 'expert_selection' or u.expert_capacity >= 1)
  )


def convert_run(
  dense_workdir: str, target: schema.Config, workdir: str, step: int | None = None
) -> dict:
  """Writes step 0 of `workdir` from `dense_workdir`'s checkpoint (module docstring)."""
  dense_cfg = restore.read_run_config(dense_workdir)
  _check_architecture(dense_cfg, target)
  if storage.exists(storage.join(workdir, 'checkpoints')):
    raise ConfigError(f'--workdir={workdir} already has checkpoints; choose a new directory')
  step = restore.checkpoint_step(
    Checkpointer(dense_workdir, dense_cfg.checkpoint, read_only=True), step
  )
  dense_cfg, _, dense_model = restore.restore_model(dense_workdir, step)
  converted = uoe_convert.convert_dense_state(
    nnx.to_pure_dict(nnx.state(dense_model)), target.model
  )
  one = _one_device(target)
  fns = make_step_fns(
    one, mesh_lib.make_mesh(one.mesh, jax.devices()[:1]), sharding.rules(one.mesh.rules)
  )
  state = fns.init()
  nnx.replace_by_pure_dict(state['model'], converted)
  storage.write_json(storage.join(workdir, 'config.json'), target.to_dict(), indent=2)
  storage.write_bytes(
    storage.join(workdir, 'dataset.json'),
    storage.read_bytes(storage.join(dense_workdir, 'dataset.json')),
  )
  ckpt = Checkpointer(workdir, target.checkpoint)
  ckpt.save(0, state)
  ckpt.close()
  return {
    'dense_workdir': dense_workdir,
    'dense_step': step,
    'workdir': workdir,
    'full_capacity': full_capacity(target.model),
    'max_logit_change': _logit_change(dense_cfg, dense_model, fns.model(state)),
  }


def _logit_change(cfg: schema.Config, dense_model, uoe_model, windows: int = 4) -> float:
  """Largest |Δlogit| between the two models on the first held-out windows (evaluation mode)."""
  tokens = corpus.load_split(corpus.resolve_dataset(cfg.data), 'heldout')
  batch = next(
    pipeline.eval_batches(tokens, seq_len=cfg.train.seq_len, batch_size=windows, max_batches=1),
    None,
  )
  if batch is None:
    return float('nan')
  inputs = jnp.asarray(batch['inputs'])

  def logits(model):
    model.eval()
    graphdef, state = nnx.split(model)
    return np.asarray(jax.jit(lambda s, x: nnx.merge(graphdef, s)(x)[0])(state, inputs))

  return float(np.max(np.abs(logits(dense_model) - logits(uoe_model))))


def main(argv, config_flag):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  f = flags.FLAGS
  try:
    target = schema.load(cli.config_value(config_flag), jax.device_count())
    result = convert_run(f.dense_workdir, target, f.workdir, f.step)
  except (ConfigError, corpus.DataError) as e:
    print(f'error: {e}', file=sys.stderr)
    sys.exit(1)
  print(json.dumps(result))


def run():
  config_flag = config_flags.DEFINE_config_file(
    'config', None, 'The UoE experiment config.', lock_config=True
  )
  flags.DEFINE_string('dense_workdir', None, 'The dense run to convert (written by train.train).')
  flags.DEFINE_string('workdir', None, 'New run directory for the UoE model.')
  flags.DEFINE_integer('step', None, 'Checkpoint step of the dense run; default: the newest.')
  flags.mark_flags_as_required(['config', 'dense_workdir', 'workdir'])
  app.run(lambda argv: main(argv, config_flag), flags_parser=cli.parse_flags)


if __name__ == '__main__':
  run()
