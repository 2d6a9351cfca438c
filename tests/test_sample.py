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

from configs import (
  moe_entropy,
  moe_erc,
  moe_expert_choice,
  moe_lossfree,
  moe_topk,
  routing_transformer,
  schema,
  tiny,
  uoe,
)
from eval.sample import filter_logits, sample, sample_checkpoint
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
MODEL_TYPES = {
  'dense': tiny.get_config,
  'moe_topk': moe_topk.get_config,
  'moe_capacity': _moe_capacity,
  'moe_lossfree': moe_lossfree.get_config,
  'moe_expert_choice': moe_expert_choice.get_config,
  'moe_erc': moe_erc.get_config,
  'moe_entropy': moe_entropy.get_config,
  'routing_transformer': routing_transformer.get_config,
  'uoe': uoe.get_config,
}
CAUSAL = {'dense', 'moe_topk', 'moe_lossfree', 'moe_erc', 'moe_entropy'}


def _types(fast):
  """Every model type; those not in `fast` are marked slow (each costs 3 to 6 compilations)."""
  return [
    name if name in fast else pytest.param(name, marks=pytest.mark.slow) for name in MODEL_TYPES
  ]


def _greedy_exact_prefix(model, prompt, steps):
  """Reference decoding: the exact prefix, unpadded, re-run at every step (no mask, no buffer)."""
  model.eval()
  ids = list(prompt)
  for _ in range(steps):
    logits = model(jnp.asarray([ids], jnp.int32))[0]
    ids.append(int(jnp.argmax(logits[0, -1, :257])))
  return ids


@pytest.mark.parametrize('name', _types(fast={'moe_expert_choice'}))  # ~8-11 s each
def test_sampling_is_deterministic_per_seed_and_exact(name):
  c = MODEL_TYPES[name]('tiny')
  model = random_model(c)
  assert model.causal == (name in CAUSAL)
  prompt = [72, 105, 32]
  run = lambda seed, temperature=2.0: sample(
    model, prompt, max_new_tokens=3, vocab_size=257, temperature=temperature, seed=seed
  )
  a = run(3)
  assert a[:3] == prompt and len(a) == 6 and max(a) < 257
  assert a == run(3)
  assert a[3:] != run(4)[3:]
  # The (masked, for a non-causal model) fixed buffer decodes what the exact prefix decodes.
  assert run(0, temperature=0.0) == _greedy_exact_prefix(model, prompt, 3)


@pytest.mark.parametrize('name', _types(fast={'moe_capacity'}))
def test_padding_changes_earlier_logits_unless_causal_or_masked(name):
  c = MODEL_TYPES[name]('tiny')
  model = random_model(c)
  model.eval()
  graphdef, state = nnx.split(model)
  logits = jax.jit(lambda s, t, seg: nnx.merge(graphdef, s)(t, segment_ids_BL=seg)[0])
  tokens_1L = jnp.asarray([[72, 105, 32, 100]], jnp.int32)
  prefix = np.asarray(logits(state, tokens_1L, None))
  # A buffer of 32: longer than routing attention's tiny window (16), so its clusters must choose.
  buffer = jnp.pad(tokens_1L, ((0, 0), (0, 28)))
  padded = np.asarray(logits(state, buffer, None))[:, :4]
  assert np.allclose(prefix, padded, rtol=1e-5, atol=1e-5) == model.causal
  masked = np.asarray(logits(state, buffer, (jnp.arange(32) < 4).astype(jnp.int32)[None]))[:, :4]
  np.testing.assert_allclose(masked, prefix, rtol=1e-5, atol=1e-5 * np.abs(prefix).max())


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
    [
      sys.executable,
      '-m',
      'eval.sample',
      f'--workdir={workdir}',
      '--prompt=def ',
      '--max_new_tokens=4',
      '--seed=1',
      '--top_k=20',
    ],
    cwd=ROOT,
    capture_output=True,
    text=True,
    timeout=120,
    env={**os.environ, 'JAX_PLATFORMS': 'cpu'},
  )
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert json.loads(proc.stdout.strip().splitlines()[-1])['tokens'] == out['tokens']
