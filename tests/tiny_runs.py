"""Tiny models of an experiment config, shared by the model tests: a short training run, or
random weights without training."""

import json
import os

import jax

from configs import schema
from eval import causality
from eval.routing_report import read_metrics
from model.transformer import Transformer
from train.train import train_and_evaluate


def train_tiny(
  config_module, tmp_path_factory, steps: int = 16, log_every: int = 4
) -> tuple[str, list[dict]]:
  """Trains `config_module`'s `:tiny` variant on the default corpus: (workdir, its training
  records from metrics.jsonl)."""
  c = config_module.get_config('tiny')
  c.data.cache_dir = str(tmp_path_factory.mktemp('corpus'))
  c.train.update(steps=steps, log_every=log_every)
  workdir = tmp_path_factory.mktemp('run')
  train_and_evaluate(schema.load(c, jax.device_count()), str(workdir))
  return str(workdir), read_metrics(str(workdir))


def random_model(config, scale: float = 0.3, seed: int = 0) -> Transformer:
  """The Transformer of a ConfigDict with N(0, scale²) weights and routing state."""
  return causality.random_model(
    schema.load(config, jax.device_count()).model, scale=scale, seed=seed
  )


def tiny_train_config(cache_dir, **train) -> schema.Config:
  """configs/tiny.py with the default corpus prepared under `cache_dir` and `train` overrides."""
  from configs import tiny  # pylint: disable=g-import-not-at-top

  c = tiny.get_config()
  c.data.cache_dir = str(cache_dir)
  c.train.update(**train)
  return schema.load(c, jax.device_count())


def train_command(workdir, cache_dir, *extra) -> list[str]:
  """`python -m train.train` on configs/tiny.py (run from the repository root)."""
  import sys  # pylint: disable=g-import-not-at-top

  return [
    sys.executable,
    '-m',
    'train.train',
    '--config=configs/tiny.py',
    f'--workdir={workdir}',
    f'--config.data.cache_dir={cache_dir}',
    *extra,
  ]


def metrics_rows(workdir) -> list[dict]:
  """Every row of DIR/metrics.jsonl as written (no de-duplication: tests check there is none)."""
  from data import storage  # pylint: disable=g-import-not-at-top  (the workdir may be gs://)

  text = storage.read_text(storage.join(str(workdir), 'metrics.jsonl'))
  return [json.loads(line) for line in text.splitlines()]


def checkpoint_state(workdir, cfg: schema.Config, step: int | None = None) -> tuple[int, dict]:
  """(step, host copy of the state) of the checkpoint at `step` (default: the newest)."""
  from configs import sharding  # pylint: disable=g-import-not-at-top
  from train import mesh as mesh_lib  # pylint: disable=g-import-not-at-top
  from train.checkpoint import Checkpointer  # pylint: disable=g-import-not-at-top
  from train.step import make_step_fns  # pylint: disable=g-import-not-at-top

  ckpt = Checkpointer(str(workdir), cfg.checkpoint, read_only=True)
  fns = make_step_fns(cfg, mesh_lib.make_mesh(cfg.mesh), sharding.rules(cfg.mesh.rules))
  step = ckpt.latest_step() if step is None else step
  return step, jax.device_get(ckpt.restore(step, fns.abstract_state()))


def weights_only_run(workdir, config, seed: int = 0) -> schema.Config:
  """A run directory with config.json and a step-0 checkpoint of the freshly initialised model of
  ConfigDict `config` at `seed` (no training, no data position): a cheap source for warm starts,
  export and evaluation tests."""
  import dataclasses  # pylint: disable=g-import-not-at-top

  from configs import sharding  # pylint: disable=g-import-not-at-top
  from train import mesh as mesh_lib  # pylint: disable=g-import-not-at-top
  from train.checkpoint import Checkpointer  # pylint: disable=g-import-not-at-top
  from train.restore import ONE_DEVICE  # pylint: disable=g-import-not-at-top
  from train.step import init_state  # pylint: disable=g-import-not-at-top

  cfg = schema.load(config, 1)
  cfg = dataclasses.replace(cfg, mesh=ONE_DEVICE, train=dataclasses.replace(cfg.train, seed=seed))
  state = init_state(cfg, mesh_lib.make_mesh(ONE_DEVICE, jax.devices()[:1]), sharding.rules('dp'))
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, 'config.json'), 'w') as f:
    json.dump(cfg.to_dict(), f, indent=2)
  ckpt = Checkpointer(str(workdir), cfg.checkpoint)
  ckpt.save(0, state)
  ckpt.close()
  return cfg
