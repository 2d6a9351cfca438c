"""eval/sample.py: filters, determinism, exact prefix == fixed buffer for a dense model, CLI."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs import schema, tiny
from eval.sample import filter_logits, sample, sample_checkpoint
from model.transformer import Transformer
from train.train import train_and_evaluate

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_filter_logits_top_k_and_top_p():
  logits = jnp.log(jnp.asarray([0.5, 0.3, 0.15, 0.05]))
  kept = lambda **kw: np.isfinite(filter_logits(logits, temperature=1.0, **kw))
  np.testing.assert_array_equal(kept(top_k=2, top_p=1.0), [1, 1, 0, 0])
  np.testing.assert_array_equal(kept(top_k=0, top_p=0.7), [1, 1, 0, 0])
  np.testing.assert_array_equal(kept(top_k=0, top_p=0.85), [1, 1, 1, 0])
  np.testing.assert_array_equal(kept(top_k=0, top_p=0.1), [1, 0, 0, 0])


def test_dense_sampling_is_deterministic_and_buffer_equals_prefix():
  cfg = schema.load(tiny.get_config(), jax.device_count()).model
  model = nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0)))  # numpy weights: no eager init
  state = nnx.state(model)
  rng = np.random.default_rng(0)
  pure = jax.tree.map(lambda a: jnp.asarray(0.3 * rng.standard_normal(a.shape), a.dtype),
                      nnx.to_pure_dict(state))
  nnx.replace_by_pure_dict(state, pure)
  nnx.update(model, state)
  prompt = [72, 105, 32]
  run = lambda **kw: sample(model, prompt, max_new_tokens=3, vocab_size=257, **kw)
  a = run(temperature=1.0, seed=3, exact_prefix=False)
  assert a == run(temperature=1.0, seed=3, exact_prefix=False)
  assert a == run(temperature=1.0, seed=3, exact_prefix=True)
  assert a[:3] == prompt and len(a) == 6 and max(a) < 257


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
