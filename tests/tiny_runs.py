"""Tiny models of an experiment config, shared by the model tests: a short training run, or
random weights without training."""

import jax

from configs import schema
from eval import causality
from eval.routing_report import read_metrics
from model.transformer import Transformer
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


def random_model(config, scale: float = 0.3, seed: int = 0) -> Transformer:
  """The Transformer of a ConfigDict with N(0, scale²) weights and routing state."""
  return causality.random_model(schema.load(config, jax.device_count()).model, scale=scale,
                                seed=seed)
