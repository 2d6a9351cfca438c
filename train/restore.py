"""A trained run read back from its workdir: its config, its tokenizer, its checkpoints.

`restore_model` is the one way a model comes back from a checkpoint: the evaluation
(`train.evaluation`, `python -m eval.evaluate`), the per-model tools of eval/, benchmarks and
`python -m train.uoe_from_dense` all go through it.
"""

import dataclasses
import math
from typing import NamedTuple

import jax
from flax import nnx

from configs import schema, sharding
from data import corpus, storage
from data.tokenizer import get_tokenizer
from model import axes
from model.config import ConfigError
from model.transformer import Transformer
from train import mesh as mesh_lib
from train.checkpoint import Checkpointer
from train.step import build_model, with_shardings

ONE_DEVICE = schema.MeshConfig(shape=(1, 1, 1, 1), rules='dp')


class TokenizerIdentity(NamedTuple):
  fingerprint: str
  spec: str


class RestoredModel(NamedTuple):
  """A checkpoint's model (`restore_model`), with the run's config (its `mesh` the one restored
  onto) and the checkpoint's step."""

  cfg: schema.Config
  step: int
  model: Transformer


def read_run_config(workdir: str) -> schema.Config:
  """The frozen config a run was trained with, from DIR/config.json."""
  config_path = storage.join(workdir, 'config.json')
  if not storage.exists(config_path):
    raise ConfigError(
      f'{config_path} not found: --workdir must be a directory written by train.train'
    )
  return schema.from_dict(storage.read_json(config_path))


def run_tokenizer_identity(workdir: str, data_cfg: schema.DataConfig) -> TokenizerIdentity:
  """The fingerprint and spec of the tokenizer a run was trained with: DIR/dataset.json (written by
  train.train), else the metadata of the run's own dataset (`data_cfg`)."""
  path = storage.join(workdir, 'dataset.json')
  if storage.exists(path):
    ident = storage.read_json(path)
    return TokenizerIdentity(ident['tokenizer'], ident['tokenizer_spec'])
  info = corpus.load_metadata(corpus.resolve_dataset(data_cfg))['tokenizer']
  return TokenizerIdentity(info['fingerprint'], info['spec'])


def run_tokenizer(workdir: str, data_cfg: schema.DataConfig):
  """The tokenizer of a run's dataset (one tokenizer per run: sampling and evaluation decode with
  the one the model was trained on, never `data.tokenizer`, which a prepared dataset overrides)."""
  fingerprint, spec = run_tokenizer_identity(workdir, data_cfg)
  tokenizer = get_tokenizer(spec)
  if tokenizer.fingerprint != fingerprint:
    raise corpus.DataError(
      f'tokenizer {spec!r} changed since {workdir} was trained '
      f'(fingerprint {tokenizer.fingerprint} != {fingerprint})'
    )
  return tokenizer


def check_same_tokenizer(workdir: str, data_cfg: schema.DataConfig, dataset_dir: str) -> None:
  """Refuses (one line) a dataset tokenized otherwise than the run `workdir` trained on
  `data_cfg`: its loss would be a meaningless number. Other text, same tokenizer, is fine."""
  info = corpus.load_metadata(dataset_dir)['tokenizer']
  fingerprint, spec = run_tokenizer_identity(workdir, data_cfg)
  if info['fingerprint'] != fingerprint:
    raise corpus.DataError(
      f'--data={dataset_dir} is tokenized with {info["spec"]} '
      f'({info["fingerprint"]}) but {workdir} was trained with {spec} '
      f"({fingerprint}); evaluate a dataset prepared with the run's tokenizer"
    )


def checkpoint_step(ckpt: Checkpointer, step: int | None) -> int:
  """`step` if a complete checkpoint exists there (default: the newest); a one-line error otherwise."""
  steps = ckpt.all_steps()
  if not steps:
    raise ConfigError(f'no complete checkpoint in {ckpt.directory}')
  step = steps[-1] if step is None else step
  if step not in steps:
    raise ConfigError(
      f'--step={step}: no checkpoint at that step in {ckpt.directory}; available: {steps}'
    )
  return step


def restore_model(
  workdir: str, step: int | None = None, *, mesh: schema.MeshConfig = ONE_DEVICE
) -> RestoredModel:
  """The model of a run's checkpoint (default: the newest step) in evaluation mode: weights and
  routing state, no optimizer state, laid out on `mesh` over the first devices here (default:
  one device; `train.evaluation` passes a mesh of several)."""
  cfg = dataclasses.replace(read_run_config(workdir), mesh=mesh)
  ckpt = Checkpointer(workdir, cfg.checkpoint, read_only=True)
  step = checkpoint_step(ckpt, step)
  devices = jax.devices()[: math.prod(mesh.resolved_shape(jax.device_count()))]
  model_def, abstract = nnx.split(nnx.eval_shape(lambda: build_model(cfg)))
  shardings = axes.state_shardings(
    abstract, mesh_lib.make_mesh(mesh, devices), sharding.rules(mesh.rules)
  )
  model = nnx.merge(model_def, ckpt.restore_model(step, with_shardings(abstract, shardings)))
  model.eval()
  return RestoredModel(cfg, step, model)
