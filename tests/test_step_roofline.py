"""benchmarks.step_roofline at its --smoke size: every field of the result present and sane."""

import pytest

from benchmarks import step_roofline
from configs import demo


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


def test_unknown_shape_is_one_line():
  with pytest.raises(step_roofline.Unmeasurable, match='known: demo, large'):
    step_roofline.build_config(demo.get_config(), 'huge', moe=False)
