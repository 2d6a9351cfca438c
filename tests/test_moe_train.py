"""A tiny MoE model trains end to end and logs its per-layer routing metrics."""

import pytest

from configs import moe_topk
from eval.evaluate import evaluate_checkpoint
from tests.tiny_runs import train_tiny


# A whole training (~24 s on 2 cores). Its parts run in the default suite: the MoE layers'
# statistics (test_erc.py, test_segment_cache.py), the metrics logger (test_routing_report.py),
# the loop (test_train.py), the coupling level (test_erc.py).
@pytest.mark.slow
def test_tiny_moe_trains_and_logs_routing(tmp_path_factory):
  workdir, records = train_tiny(moe_topk, tmp_path_factory)
  assert [r['step'] for r in records] == [4, 8, 12, 16]
  assert records[-1]['loss'] < records[0]['loss'] - 0.5
  for layer in (0, 1):
    for name in (
      'load_max_mean',
      'load_cv',
      'dropped_fraction',
      'router_entropy',
      'z_loss',
      'balance_loss',
      'dead_experts',
    ):
      assert f'layer_{layer}/moe/{name}' in records[-1], name
    assert 0 <= records[-1][f'layer_{layer}/moe/dead_experts'] <= 8
  assert not any('expert_counts' in key for key in records[-1])
  assert records[-1]['aux_loss'] > 0
  # Evaluation reports the ERC coupling level alpha* of every MoE layer, ERC-trained or not.
  result = evaluate_checkpoint(workdir)
  for layer in (0, 1):
    assert result[f'layer_{layer}/moe/coupling_level'] > 0
