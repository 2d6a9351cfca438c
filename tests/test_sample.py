"""eval/sample.py: filters; for every model type determinism per seed, and the fixed buffer
exactly when padding leaves earlier logits unchanged; the CLI."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs import (moe_entropy, moe_erc, moe_expert_choice, moe_lossfree, moe_topk,
                     routing_transformer, schema, tiny, uoe)
from eval.sample import filter_logits, needs_exact_prefix, sample, sample_checkpoint
from tests.tiny_runs import random_model
from train.train import train_and_evaluate

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_filter_logits_top_k_and_top_p():
  logits = jnp.log(jnp.asarray([0.5, 0.3, 0.15, 0.05]))
  kept = lambda **kw: np.isfinite(filter_logits(logits, temperature=1.0, **kw))
  np.testing.assert_array_equal(kept(top_k=2, top_p=1.0), [1, 1, 0, 0])
  np.testing.assert_array_equal(kept(top_k=0, top_p=0.7), [1, 1, 0, 0])
  np.testing.assert_array_equal(kept(top_k=0, top_p=0.85), [1, 1, 1, 0])
  np.testing.assert_array_equal(kept(top_k=0, top_p=0.1), [1, 0, 0, 0])


def _moe_capacity(arg):
  c = moe_topk.get_config(arg)
  c.moe.execution = 'capacity'
  return c


# Every model type: its config's get_config (moe_capacity: top-k with capacity execution).
MODEL_TYPES = {'dense': tiny.get_config, 'moe_topk': moe_topk.get_config,
               'moe_capacity': _moe_capacity, 'moe_lossfree': moe_lossfree.get_config,
               'moe_expert_choice': moe_expert_choice.get_config, 'moe_erc': moe_erc.get_config,
               'moe_entropy': moe_entropy.get_config,
               'routing_transformer': routing_transformer.get_config, 'uoe': uoe.get_config}
FIXED_BUFFER = {'dense', 'moe_topk', 'moe_lossfree', 'moe_erc', 'moe_entropy'}


def _types(fast):
  """Every model type; those not in `fast` are marked slow (each costs 3 to 6 compilations)."""
  return [name if name in fast else pytest.param(name, marks=pytest.mark.slow)
          for name in MODEL_TYPES]


@pytest.mark.parametrize('name', _types(fast={'moe_topk', 'moe_expert_choice'}))
def test_sampling_is_deterministic_per_seed(name):
  c = MODEL_TYPES[name]('tiny')
  exact = needs_exact_prefix(schema.load(c, jax.device_count()))
  assert exact == (name not in FIXED_BUFFER)
  model = random_model(c)
  prompt = [72, 105, 32]
  run = lambda seed, exact_prefix=exact: sample(model, prompt, max_new_tokens=3, vocab_size=257,
                                                temperature=2.0, seed=seed,
                                                exact_prefix=exact_prefix)
  a = run(3)
  assert a[:3] == prompt and len(a) == 6 and max(a) < 257
  assert a == run(3)
  assert a[3:] != run(4)[3:]
  if not exact:  # the fixed buffer is claimed exact: it samples what the exact prefix samples
    assert a == run(3, exact_prefix=True)


@pytest.mark.parametrize('name', _types(fast={'moe_capacity'}))
def test_padding_changes_earlier_logits_exactly_when_the_prefix_is_rerun(name):
  c = MODEL_TYPES[name]('tiny')
  graphdef, state = nnx.split(random_model(c))
  logits = jax.jit(lambda s, t: nnx.merge(graphdef, s)(t)[0])
  tokens_1L = jnp.asarray([[72, 105, 32, 100]], jnp.int32)
  prefix = np.asarray(logits(state, tokens_1L))
  # A buffer of 32: longer than routing attention's tiny window (16), so its clusters must choose.
  padded = np.asarray(logits(state, jnp.pad(tokens_1L, ((0, 0), (0, 28)))))[:, :4]
  same = np.allclose(prefix, padded, rtol=1e-5, atol=1e-5)
  assert same == (not needs_exact_prefix(schema.load(c, jax.device_count())))


@pytest.mark.slow
def test_sample_cli_on_a_checkpoint(tmp_path_factory):
  c = tiny.get_config()
  c.data.cache_dir = str(tmp_path_factory.mktemp('corpus'))
  c.train.update(steps=4, log_every=2)
  workdir = tmp_path_factory.mktemp('run')
  train_and_evaluate(schema.load(c, jax.device_count()), str(workdir))
  out = sample_checkpoint(str(workdir), 'def ', max_new_tokens=4, seed=1, top_k=20)
  assert out['step'] == 4 and len(out['tokens']) <= 4
  proc = subprocess.run(
      [sys.executable, '-m', 'eval.sample', f'--workdir={workdir}', '--prompt=def ',
       '--max_new_tokens=4', '--seed=1', '--top_k=20'],
      cwd=ROOT, capture_output=True, text=True, timeout=120,
      env={**os.environ, 'JAX_PLATFORMS': 'cpu'})
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert json.loads(proc.stdout.strip().splitlines()[-1])['tokens'] == out['tokens']
