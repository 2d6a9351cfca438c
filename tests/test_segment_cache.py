"""eval/segment_cache.py: hand-built assignments with known answers, the MoE layer's assignment
record (top-k, capacity drops, expert choice), and the checkpoint entry point."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs import moe_expert_choice, moe_topk, schema
from eval.segment_cache import (
  checkpoint_segment_cache,
  model_segment_cache,
  segment_best_hit_rate,
  segment_cache_hit,
)
from model.config import ConfigError
from model.moe_layer import expert_choice_assignment, topk_assignment
from tests.tiny_runs import random_model, train_tiny
from train.train import write_config


def _one_expert_per_token(experts_BL, num_experts=8):
  """assign_BLE with token (b, l) routed to expert experts_BL[b][l] only."""
  return np.eye(num_experts, dtype=bool)[np.asarray(experts_BL)]


def test_tokens_on_two_experts_always_hit():
  assign_BLE = np.zeros((2, 16, 8), bool)
  assign_BLE[..., :2] = True
  assert segment_cache_hit(assign_BLE, 8, 2) == 1.0
  assert segment_best_hit_rate(assign_BLE, 8, 2) == 1.0


def test_cycling_experts_known_fractions():
  # First segment stays on expert 0; the second cycles through all 8 experts.
  assign_BLE = _one_expert_per_token([[0] * 8 + list(range(8))])
  assert segment_cache_hit(assign_BLE, 8, 2) == 0.5
  assert segment_best_hit_rate(assign_BLE, 8, 2) == pytest.approx((1.0 + 2 / 8) / 2)
  assert segment_cache_hit(assign_BLE, 2, 2) == 1.0  # any two tokens fit two slots
  assert segment_cache_hit(assign_BLE, 4, 2) == 0.5  # 0000 0000 | 0123 4567
  assert segment_best_hit_rate(assign_BLE, 16, 4) == pytest.approx(12 / 16)


def test_segments_stay_inside_sequences_and_drop_the_partial_tail():
  assign_BLE = _one_expert_per_token([[0, 0, 0, 0, 5, 6], [1, 1, 1, 1, 7, 4]])
  # Windows over the flattened batch would be 0000 | 5611 | 1174: one hit in three.
  assert segment_cache_hit(assign_BLE, 4, 1) == 1.0
  assert segment_best_hit_rate(assign_BLE, 4, 1) == 1.0


def test_best_hit_rate_counts_activations_of_k2_tokens():
  assign_BLE = np.zeros((1, 4, 8), bool)
  for t, experts in enumerate([(0, 1), (0, 2), (0, 1), (3, 4)]):
    assign_BLE[0, t, list(experts)] = True
  assert segment_cache_hit(assign_BLE, 4, 2) == 0.0  # five experts
  assert segment_best_hit_rate(assign_BLE, 4, 2) == pytest.approx(5 / 8)  # experts 0 (3) and 1 (2)
  assert segment_cache_hit(assign_BLE, 4, 5) == 1.0


def test_segment_without_activations_counts_as_served():
  assign_BLE = np.zeros((1, 8, 4), bool)  # every assignment dropped
  assert segment_cache_hit(assign_BLE, 8, 2) == 1.0
  assert segment_best_hit_rate(assign_BLE, 8, 2) == 1.0


def test_bad_input_is_refused():
  with pytest.raises(ValueError, match='expected \\[batch, length, experts\\]'):
    segment_cache_hit(np.zeros((8, 4), bool), 4, 2)
  with pytest.raises(ValueError, match='no full segment of 32 tokens'):
    segment_best_hit_rate(np.zeros((1, 16, 4), bool), 32, 2)
  with pytest.raises(ValueError, match='expected both >= 1'):
    segment_cache_hit(np.zeros((1, 16, 4), bool), 8, 0)


def test_assignments_exclude_capacity_drops_and_follow_expert_choice():
  experts_TK = jnp.asarray([[0, 1], [2, 1]])
  kept_TK = jnp.asarray([[True, False], [True, True]])
  np.testing.assert_array_equal(
    topk_assignment(experts_TK, 4, kept_TK), [[1, 0, 0, 0], [0, 1, 1, 0]]
  )
  np.testing.assert_array_equal(topk_assignment(experts_TK, 4), [[1, 1, 0, 0], [0, 1, 1, 0]])
  tokens_EC = jnp.asarray([[0, 2], [2, 1]])  # expert 0 took tokens 0, 2; expert 1 took 2, 1
  kept_EC = jnp.ones((2, 2), bool)
  np.testing.assert_array_equal(
    expert_choice_assignment(tokens_EC, kept_EC, 4), [[1, 0], [0, 1], [1, 1], [0, 0]]
  )
  kept_EC = jnp.asarray([[True, False], [True, True]])  # expert 0's second slot unused
  np.testing.assert_array_equal(
    expert_choice_assignment(tokens_EC, kept_EC, 4), [[1, 0], [0, 1], [0, 1], [0, 0]]
  )


@pytest.mark.parametrize(
  'router,execution', [('topk', 'dropless'), ('topk', 'capacity'), ('expert_choice', 'dropless')]
)
def test_model_reports_every_moe_layer(router, execution):
  c = (moe_expert_choice if router == 'expert_choice' else moe_topk).get_config('tiny')
  c.moe.update(execution=execution, capacity_factor=1.0)  # two MoE layers in one scanned stage
  model = random_model(c)
  tokens_BL = jax.random.randint(jax.random.key(1), (2, 64), 0, c.model.vocab_size)
  layers = model_segment_cache(model, [tokens_BL, tokens_BL[::-1]], cache_size=4, lengths=(8, 32))
  assert sorted(layers) == [0, 1]
  for row in layers.values():
    assert sorted(row) == [
      'experts_per_token',
      'segment_best_hit_rate_32',
      'segment_best_hit_rate_8',
      'segment_cache_hit_32',
      'segment_cache_hit_8',
    ]
    assert all(0.0 <= v <= 1.0 for k, v in row.items() if k != 'experts_per_token')
    assert row['segment_best_hit_rate_8'] >= row['segment_cache_hit_8']  # a hit serves everything
    assert row['segment_cache_hit_8'] >= row['segment_cache_hit_32']  # subsegments of a hit hit
  ept = [row['experts_per_token'] for row in layers.values()]
  if router == 'expert_choice':  # E * C / L tokens per expert: 8 * ceil(64 * 1.0 / 8) / 64
    assert ept == [1.0, 1.0]
  elif execution == 'dropless':
    assert ept == [2.0, 2.0]
  else:  # the record holds what ran: the top-2 assignments less those dropped
    graphdef, state = nnx.split(model)
    aux = jax.jit(lambda s, t: nnx.merge(graphdef, s)(t)[1])(state, tokens_BL)
    for i, s in model.layer_stats(aux['stats']).items():
      dropped = float(aux['metrics'][f'layer_{i}/moe/dropped_fraction'])
      assert 0 < dropped < 1
      assert float(s['mlp']['assign_BLE'].sum()) == pytest.approx(
        float(s['mlp']['expert_counts'].sum()) * (1 - dropped)
      )


def test_dense_model_has_no_layers():
  c = moe_topk.get_config('tiny')
  c.moe.num_experts = 0
  dense = random_model(c)
  assert model_segment_cache(dense, [jnp.zeros((1, 64), jnp.int32)], cache_size=4) == {}


def test_checkpoint_errors_are_one_line(tmp_path):
  cfg = schema.load(moe_topk.get_config('tiny'), jax.device_count())
  write_config(cfg, str(tmp_path))
  with pytest.raises(ConfigError, match='no complete checkpoint in'):
    checkpoint_segment_cache(str(tmp_path))
  with pytest.raises(ConfigError, match='segment lengths in 1..train.seq_len=64'):
    checkpoint_segment_cache(str(tmp_path), lengths=(8, 128))


@pytest.mark.slow
def test_checkpoint_segment_cache_on_a_tiny_run(tmp_path_factory):
  workdir, _ = train_tiny(moe_topk, tmp_path_factory, steps=4)
  out = checkpoint_segment_cache(workdir, max_batches=1)
  assert out['step'] == 4 and out['cache_size'] == 4
  assert sorted(out['layers']) == [0, 1]
  for row in out['layers'].values():
    assert 0.0 <= row['segment_cache_hit_32'] <= row['segment_best_hit_rate_32'] <= 1.0
