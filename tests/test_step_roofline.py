"""benchmarks.step_roofline at its --smoke size: every field of the result present and sane."""

import pytest

from benchmarks import step_roofline
from configs import demo
from model import chunked_attention, plan


@pytest.mark.slow  # ~15 s of compiling and timing; the tool, not the model, is under test
def test_smoke_result_fields():
  result = step_roofline.run(demo.get_config(), 'smoke', moe=False, steps=3)
  assert 0 < result['roofline_fraction'] <= 1.5
  assert result['step_s'] > 0 and result['roofline_step_s'] > 0
  assert result['gflops_per_s_plan'] > 0 and result['plan_flops_per_token'] > 0
  parts = result['breakdown_s']
  for part in ('forward', 'forward_backward', 'optimizer', 'finite_guard', 'metrics', 'step'):
    assert parts[part] > 0, part
  assert result['gemms'] and all(g['gflops_per_s'] > 0 and g['count'] > 0 for g in result['gemms'])
  assert isinstance(result['profile']['top_ops'], list)
  for op in result['profile']['top_ops']:
    assert op['seconds_per_step'] >= 0 and 0 <= op['share_of_step'] <= 1.5
  assert any(s['source'].startswith('model/') for s in result['profile']['top_sources'])
  assert set(result['variants']) == {
    'as_configured',
    'attention_impl_xla',
    'scan_layers_True',
    'attention_impl_xla_scan_layers_True',
  }
  assert all(v['median_s'] >= v['min_s'] > 0 for v in result['variants'].values())
  assert result['moe_over_dense'] is None


@pytest.mark.slow  # the MoE smoke step in five more variants
def test_smoke_moe_times_the_dense_step_and_other_block_rows_in_the_same_run():
  config = demo.get_config()
  config.moe.gmm_impl = 'scan'  # the kernel with blocks
  result = step_roofline.run(config, 'smoke', moe=True, steps=2)
  assert result['gmm_kernel'] == 'scan'
  assert {'dense_equal_active_flops', 'moe_blocks_128', 'moe_blocks_512'} <= set(result['variants'])
  assert result['moe_config']['block_size'] == 0  # as configured: auto
  assert result['moe_over_dense'] > 0


@pytest.mark.parametrize('impl', ['xla', 'chunked'])
def test_gemm_flops_are_the_plan_flops_less_the_unscored_pairs(impl):
  """With the reference kernel the listed matmuls sum exactly to the plan's FLOPs (which count
  every key, PaLM's convention); the chunked kernel skips the pairs above its chunks' diagonal."""
  config = demo.get_config()
  config.attention.impl = impl
  cfg = step_roofline.build_config(config, 'demo', moe=False)
  counts = step_roofline.gemms(cfg)['counts']
  flops = sum(2 * b * m * k * n * count for (b, m, k, n), count in counts.items())
  m, t = cfg.model, cfg.train
  planned = plan.build(m, t.seq_len).flops_per_token * t.batch_size * t.seq_len
  pairs = chunked_attention.scored_pairs(t.seq_len) if impl == 'chunked' else t.seq_len**2
  unscored = t.seq_len**2 - pairs  # per row and head: 6 matmuls of 2 FLOPs per pair and channel
  assert flops == planned - 12 * m.num_layers * t.batch_size * m.num_heads * m.head_dim * unscored


def test_unknown_shape_is_one_line():
  with pytest.raises(step_roofline.Unmeasurable, match='known: demo, large'):
    step_roofline.build_config(demo.get_config(), 'huge', moe=False)
