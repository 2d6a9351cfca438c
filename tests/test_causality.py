"""Causality declared by the layer kinds, measured by eval.causality on every experiment config:
padded prefixes equal prefixes alone, declared-causal models never read the future, packing is
accepted only where documents cannot influence each other."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs import schema, sharding
from data import pipeline
from data.tokenizer import get_tokenizer
from eval import causality, evaluate
from model.config import ConfigError
from tests.test_config import _experiment_files, _load_module
from train import mesh as mesh_lib
from train.step import make_step_fns

# Which experiment configs read the future (and so refuse packing); a new config must be added.
NON_CAUSAL = {'demo.py', 'moe_expert_choice.py', 'routing_transformer.py', 'uoe.py'}


def _tiny(path_or_name: str):
  path = (
    path_or_name
    if os.sep in path_or_name
    else os.path.join(os.path.dirname(_experiment_files()[0]), path_or_name)
  )
  return _load_module(path).get_config('tiny')


# Every config is checked; those whose layer kinds another default-run case already covers
# (moe_topk: token-choice MoE; tiny: dense) run in the slow set.
_COVERED = {'base.py', 'moe_lossfree.py', 'moe_erc.py', 'moe_entropy.py'}


@pytest.mark.parametrize(
  'path',
  [
    pytest.param(p, marks=pytest.mark.slow) if os.path.basename(p) in _COVERED else p
    for p in _experiment_files()
  ],
  ids=os.path.basename,
)
def test_every_experiment_config_is_as_declared(path):
  record, problems = causality.check_config(_tiny(path), name=os.path.basename(path))
  assert not problems, problems
  assert record['causal'] == (os.path.basename(path) not in NON_CAUSAL), record
  assert record['prefix_padding_change'] <= record['tolerance']


# (config, overrides, causal, bitwise: a causal model's logits are bitwise independent of other
# tokens; capacity execution is not, because a later token's choice moves an earlier token's
# assignment to another slot row of the expert matmul: f32 rounding, within the tolerance)
@pytest.mark.parametrize(
  'name,overrides,causal,bitwise',
  [
    ('moe_topk.py', {'moe.execution': 'capacity', 'moe.capacity_factor': 1.0}, False, False),
    ('moe_topk.py', {'moe.execution': 'capacity', 'moe.capacity_factor': 4.0}, True, False),
    ('moe_topk.py', {'moe.jitter': 0.5}, True, True),  # jitter is off in evaluation mode
    ('uoe.py', {'uoe.paradigm': 'expert_selection', 'uoe.head_capacity': 2.0}, True, True),
    pytest.param(
      'routing_transformer.py',
      {'attention.non_routing': 'dense'},
      False,
      False,
      marks=pytest.mark.slow,
    ),
  ],
)
def test_variants_are_as_declared(name, overrides, causal, bitwise):
  config = _tiny(name)
  for key, value in overrides.items():
    group, field = key.split('.')
    config[group][field] = value
  record, problems = causality.check_config(config, name=name)
  assert not problems, problems
  assert record['causal'] == causal and record['packing'] == ('ok' if causal else 'refused')
  if bitwise:
    assert record['future_change'] == 0.0 and record['cross_document_change'] == 0.0


def test_packing_is_refused_with_the_reason_for_models_that_read_the_future():
  config = _tiny('uoe.py')
  config.data.packing = True
  with pytest.raises(ConfigError, match=r'^data.packing=True is refused: SMHA: each head takes'):
    schema.load(config, jax.device_count())
  config = _tiny('moe_topk.py')
  config.data.packing = True
  assert schema.load(config, jax.device_count()).data.packing


@pytest.mark.slow  # ~17 s (a short training, then every sampled prefix run alone)
def test_exact_prefix_evaluation_scores_each_position_from_its_prefix_alone():
  """eval.evaluate on a non-causal model: `loss` is the mean cross-entropy of the sampled
  positions, each predicted from its prefix alone (checked against prefixes run unpadded);
  the teacher-forced numbers are beside it, labelled."""
  config = _tiny('moe_expert_choice.py')
  config.eval.update(batch_size=8, max_batches=1, positions_per_window=1)
  cfg = schema.load(config, jax.device_count())
  model = causality.random_model(cfg.model, seed=1)
  fns = make_step_fns(cfg, mesh_lib.make_mesh(cfg.mesh), sharding.rules(cfg.mesh.rules))
  tokens = np.random.default_rng(0).integers(0, 257, size=8 * 64 + 9).astype(np.int32)
  result = evaluate.evaluate_model(
    fns, {'model': nnx.state(model)}, tokens, cfg, get_tokenizer('byte')
  )
  assert result['causal'] is False and result['evaluation'].startswith('exact_prefix')
  assert result['tokens'] == 8 and result['teacher_forced_tokens'] == 8 * 64
  assert result['loss_stderr'] > 0 and 'teacher_forced_bits_per_byte' in result
  batch = next(pipeline.eval_batches(tokens, seq_len=64, batch_size=8, max_batches=1))
  cuts_BP = evaluate.sampled_positions(batch['inputs'], 1)
  model.eval()
  graphdef, state = nnx.split(model)
  forward = jax.jit(lambda s, x: nnx.merge(graphdef, s)(x)[0])
  ce = []
  for b, cuts in enumerate(cuts_BP):
    for cut in cuts:
      logits = np.asarray(forward(state, jnp.asarray(batch['inputs'][b : b + 1, : cut + 1])))
      ce.append(-jax.nn.log_softmax(logits[0, cut])[batch['targets'][b, cut]])
  np.testing.assert_allclose(result['loss'], np.mean(ce), rtol=1e-5)
  np.testing.assert_allclose(
    result['paired_loss'], result['teacher_forced_loss'] + result['future_leak'], rtol=1e-12
  )
  with pytest.raises(ConfigError, match='positions_per_window=0: expected >= 1'):
    evaluate.evaluate_model(
      fns, {'model': nnx.state(model)}, tokens, cfg, get_tokenizer('byte'), positions_per_window=0
    )
