"""A tiny training run of an experiment config, shared by the end-to-end model tests."""

import jax

from configs import schema
from eval.routing_report import read_metrics
from train.train import train_and_evaluate


def train_tiny(config_module, tmp_path_factory, steps: int = 16,
               log_every: int = 4) -> tuple[str, list[dict]]:
  """Trains `config_module`'s `:tiny` variant on the default corpus: (workdir, its training
  records from metrics.jsonl)."""
  c = config_module.get_config('tiny')
  c.data.cache_dir = str(tmp_path_factory.mktemp('corpus'))
  c.train.update(steps=steps, log_every=log_every)
  workdir = tmp_path_factory.mktemp('run')
  train_and_evaluate(schema.load(c, jax.device_count()), str(workdir))
  return str(workdir), read_metrics(str(workdir))
