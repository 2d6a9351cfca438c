"""eval.routing_report on a synthetic metrics.jsonl: series, trigger steps, summary, files."""

import json
import os

import pytest

from eval import routing_report


def _write_metrics(workdir):
  records = []
  for step in range(10, 110, 10):
    r = {'step': step, 'loss': 3.0}
    for layer, fire in ((0, 40), (1, None)):
      fired = fire is not None and step > fire  # metrics show the state at the start of the step
      r[f'layer_{layer}/moe/h_tok'] = 0.9 - (0.002 * (step - 40) if fired else 0.0)
      r[f'layer_{layer}/moe/h_use'] = 0.99 - 0.0001 * step
      r[f'layer_{layer}/moe/h_tok_ema'] = 0.9
      r[f'layer_{layer}/moe/trigger_step'] = float(fire) if fired else -1.0
      r[f'layer_{layer}/moe/ramp_weight'] = min((step - 40) / 20, 1.0) if fired else 0.0
      r[f'layer_{layer}/moe/dead_experts'] = layer
    records.append(r)
  records.append({'step': 100, 'eval_loss': 2.5})  # held-out records carry no layers
  with open(os.path.join(workdir, 'metrics.jsonl'), 'w') as f:
    f.writelines(json.dumps(r) + '\n' for r in records)


def test_report_from_metrics(tmp_path):
  _write_metrics(tmp_path)
  records = routing_report.read_metrics(str(tmp_path))
  assert [r['step'] for r in records] == list(range(10, 110, 10))
  steps, values = routing_report.series(records, 'ramp_weight')[0]
  assert steps[-1] == 100 and values[-1] == 1.0
  assert routing_report.trigger_steps(records) == {0: 40, 1: None}
  rows = routing_report.report(str(tmp_path))
  assert rows[0]['trigger_step'] == 40 and rows[1]['trigger_step'] is None
  assert rows[0]['h_tok_at_trigger'] == pytest.approx(0.9)
  assert rows[0]['h_tok_final'] == pytest.approx(0.9 - 0.002 * 60)
  assert rows[0]['h_use_change'] == pytest.approx((0.99 - 0.01) / (0.99 - 0.004) - 1)
  assert rows[1]['dead_experts'] == 1
  out = tmp_path / 'report'
  assert (out / 'entropy.png').stat().st_size > 10_000
  assert '| 0 | 40 |' in (out / 'routing_report.md').read_text()
  assert json.loads((out / 'routing_report.json').read_text())['0']['trigger_step'] == 40


def test_missing_metrics_is_a_clear_error(tmp_path):
  with pytest.raises(FileNotFoundError, match='metrics.jsonl not found'):
    routing_report.read_metrics(str(tmp_path))
