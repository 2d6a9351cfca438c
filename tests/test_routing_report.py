"""eval.routing_report: series and trigger steps from a synthetic metrics.jsonl, the logger's vector
metrics, every plot a valid PNG (synthetic runs; a real tiny MoE + ERC + trigger + routing-attention
run under -m slow), and one-line errors for missing inputs."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from configs import moe_entropy, schema, tiny, uoe
from eval import routing_report
from train.metrics import MetricsLogger

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ALL_PLOTS = [
  'loss.png',
  'expert_load.png',
  'dead_experts.png',
  'entropy.png',
  'trigger_timeline.png',
  'cluster_occupancy.png',
  'coupling.png',
]


def _routed_config(steps: int = 16):
  """configs/moe_entropy.py:tiny with ERC on and routing attention in the last layer."""
  c = moe_entropy.get_config('tiny')
  c.moe.erc_weight = 1.0
  c.attention.update(
    kind='routing',
    routing_layers=(-1,),
    window=16,
    local_window=16,
    num_clusters=0,
    routing_heads=-1,
  )
  c.entropy.update(tau=0.99)
  c.train.update(steps=steps, log_every=4)
  return c


def _write_config(workdir, c) -> None:
  with open(os.path.join(workdir, 'config.json'), 'w') as f:
    json.dump(schema.load(c, 8).to_dict(), f)


def _write_metrics(workdir, routed: bool = True):
  rng = np.random.default_rng(0)
  records = []
  for step in range(10, 110, 10):
    r = {'step': step, 'loss': 3.0 - step / 100, 'lm_loss': 2.9 - step / 100}
    for layer, fire in ((0, 40), (1, None)):
      if not routed:
        break
      fired = fire is not None and step > fire  # metrics show the state at the start of the step
      r[f'layer_{layer}/moe/h_tok'] = 0.9 - (0.002 * (step - 40) if fired else 0.0)
      r[f'layer_{layer}/moe/h_use'] = 0.99 - 0.0001 * step
      r[f'layer_{layer}/moe/h_tok_ema'] = 0.9
      r[f'layer_{layer}/moe/trigger_step'] = float(fire) if fired else -1.0
      r[f'layer_{layer}/moe/ramp_weight'] = min((step - 40) / 20, 1.0) if fired else 0.0
      r[f'layer_{layer}/moe/dead_experts'] = layer
      r[f'layer_{layer}/moe/load_cv'] = 0.5
      r[f'layer_{layer}/moe/coupling_level'] = 1.5 - step / 200
      r[f'layer_{layer}/moe/expert_load'] = list(rng.dirichlet(np.ones(8)))
    if routed:
      for name in routing_report.ROUTING_CURVES:
        r[f'layer_1/routing/{name}'] = 0.5
      r['layer_1/routing/cluster_load'] = rng.dirichlet(np.ones(4), size=2).tolist()
    records.append(r)
  records.append({'step': 100, 'eval_loss': 2.5})  # held-out records carry no layers
  with open(os.path.join(workdir, 'metrics.jsonl'), 'w') as f:
    f.writelines(json.dumps(r) + '\n' for r in records)


def _assert_pngs(out, names):
  import matplotlib  # pylint: disable=g-import-not-at-top

  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  for name in names:
    path = os.path.join(out, name)
    with open(path, 'rb') as f:
      assert f.read(8) == b'\x89PNG\r\n\x1a\n', name
    image = plt.imread(path)
    assert image.ndim == 3 and image.shape[0] > 200 and image.shape[1] > 400, (name, image.shape)
    assert image.std() > 0.01, name  # not a blank canvas


def test_report_from_metrics(tmp_path):
  _write_metrics(tmp_path)
  _write_config(tmp_path, _routed_config())
  records = routing_report.read_metrics(str(tmp_path))
  assert [r['step'] for r in records] == list(range(10, 110, 10))
  assert [r['step'] for r in routing_report.read_eval_metrics(str(tmp_path))] == [100]
  steps, values = routing_report.series(records, 'ramp_weight')[0]
  assert steps[-1] == 100 and values[-1] == 1.0
  assert routing_report.trigger_steps(records) == {0: 40, 1: None}
  assert routing_report.trigger_phases(records, ramp_steps=5) == {
    0: [('coverage', 10, 40), ('ramp', 40, 45), ('specialisation', 45, 100)],
    1: [('coverage', 10, 100)],
  }
  steps, share_TN = routing_report.share_series(records, 'cluster_load', 'routing')[1]
  assert share_TN.shape == (10, 4) and np.allclose(share_TN.sum(1), 1.0)
  data = routing_report.report(str(tmp_path), checkpoint=False)
  rows = data['layers']['entropy']
  assert rows[0]['trigger_step'] == 40 and rows[1]['trigger_step'] is None
  assert rows[0]['h_tok_at_trigger'] == pytest.approx(0.9)
  assert rows[0]['h_tok_final'] == pytest.approx(0.9 - 0.002 * 60)
  assert rows[0]['h_use_change'] == pytest.approx((0.99 - 0.01) / (0.99 - 0.004) - 1)
  assert data['layers']['moe'][1]['dead_experts'] == 1 and data['dead_experts_total'] == 1
  assert data['layers']['routing'][1]['unpicked_fraction'] == 0.5
  assert (data['triggers_fired'], data['triggers_monitored']) == (1, 2)
  assert data['heldout_loss'] == 2.5
  assert [p['file'] for p in data['plots']] == ALL_PLOTS
  out = tmp_path / 'report'
  _assert_pngs(out, ALL_PLOTS)
  markdown = (out / 'routing_report.md').read_text()
  assert '| 0 | 40 |' in markdown and '![expert_load](expert_load.png)' in markdown
  assert 'fired in 1/2 monitored layers' in markdown
  assert (
    json.loads((out / 'routing_report.json').read_text())['layers']['entropy']['0']['trigger_step']
    == 40
  )


def test_dense_run_gets_the_loss_plot_only(tmp_path):
  _write_metrics(tmp_path, routed=False)
  _write_config(tmp_path, tiny.get_config())
  data = routing_report.report(str(tmp_path), checkpoint=False)
  assert [p['file'] for p in data['plots']] == ['loss.png']
  assert sorted(os.listdir(tmp_path / 'report')) == [
    'loss.png',
    'routing_report.json',
    'routing_report.md',
  ]
  layers = dict(data['layers'])
  assert [r['feed_forward'] for r in layers.pop('plan').values()] == ['mlp', 'mlp']  # the plan
  assert layers == {'entropy': {}, 'moe': {}, 'routing': {}, 'uoe': {}}
  assert (
    '| 0 | dense | mlp | causal attention, 4 heads'
    in (tmp_path / 'report' / 'routing_report.md').read_text()
  )


def test_uoe_run_gets_its_gate_plot_and_table(tmp_path):
  records = [
    {
      'step': step,
      'loss': 3.0 - step / 100,
      **{
        f'layer_{layer}/uoe/{gate}_{name}': 0.1 * layer + step / 1000
        for layer in (0, 1)
        for gate in ('attn', 'mlp')
        for name in routing_report.UOE_HEALTH
      },
    }
    for step in range(10, 60, 10)
  ]
  with open(tmp_path / 'metrics.jsonl', 'w') as f:
    f.writelines(json.dumps(r) + '\n' for r in records)
  _write_config(tmp_path, uoe.get_config('tiny'))
  data = routing_report.report(str(tmp_path), checkpoint=False)
  assert [p['file'] for p in data['plots']] == ['loss.png', 'uoe_gates.png']
  _assert_pngs(tmp_path / 'report', ['uoe_gates.png'])
  assert data['layers']['uoe'][1]['mlp_load_cv'] == pytest.approx(0.15)
  assert '| 1 | 0.1500 |' in (tmp_path / 'report' / 'routing_report.md').read_text()


def test_missing_inputs_are_one_line_errors(tmp_path):
  with pytest.raises(FileNotFoundError, match='metrics.jsonl not found'):
    routing_report.read_metrics(str(tmp_path))
  (tmp_path / 'metrics.jsonl').write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "lo\n')
  with pytest.raises(ValueError, match='metrics.jsonl line 2: not JSON'):
    routing_report.read_metrics(str(tmp_path))
  _write_metrics(tmp_path)
  with pytest.raises(FileNotFoundError, match='config.json not found'):
    routing_report.report(str(tmp_path))
  _write_config(tmp_path, tiny.get_config())
  result = subprocess.run(
    [sys.executable, '-m', 'eval.routing_report', f'--workdir={tmp_path}'],
    cwd=REPO,
    capture_output=True,
    text=True,
    timeout=120,
    env={**os.environ, 'JAX_PLATFORMS': 'cpu'},
  )
  assert result.returncode == 1
  last = result.stderr.strip().splitlines()[-1]
  assert last.startswith(f'error: no complete checkpoint in {tmp_path}/checkpoints'), result.stderr
  assert not (tmp_path / 'report').exists()


def test_logger_writes_expert_and_cluster_load(tmp_path):
  logger = MetricsLogger(
    str(tmp_path), total_steps=2, tokens_per_step=1, flops_per_token=0, peak_flops=0
  )
  for counts_E, counts_HN in (([3, 1, 0, 0], [[2, 2], [4, 0]]), ([1, 3, 0, 0], [[0, 4], [4, 0]])):
    logger.add(
      {
        'loss': 1.0,
        'layer_0/moe/expert_counts': np.array(counts_E),
        'layer_1/routing/cluster_counts': np.array(counts_HN, np.float32),
      }
    )
  record = logger.write(2)
  logger.close()
  assert record['layer_0/moe/dead_experts'] == 2
  assert record['layer_0/moe/expert_load'] == pytest.approx([0.5, 0.5, 0.0, 0.0])
  assert sum(record['layer_0/moe/expert_load']) == pytest.approx(1.0)
  assert record['layer_1/routing/cluster_load'] == [[0.25, 0.75], [1.0, 0.0]]
  assert not any(k.endswith('_counts') for k in record)
  with open(tmp_path / 'metrics.jsonl') as f:
    assert json.loads(f.readline())['layer_1/routing/cluster_load'] == [[0.25, 0.75], [1.0, 0.0]]


@pytest.mark.slow
def test_report_of_a_real_routed_run(tmp_path_factory):
  """16 steps of MoE + ERC + entropy trigger + routing attention, held-out eval every 8 steps,
  then the CLI: every plot, the checkpoint's alpha*, expert and cluster load in metrics.jsonl."""
  import jax  # pylint: disable=g-import-not-at-top

  from train.train import train_and_evaluate  # pylint: disable=g-import-not-at-top

  c = _routed_config()
  c.eval.update(every_steps=8)
  c.data.cache_dir = str(tmp_path_factory.mktemp('corpus'))
  workdir = str(tmp_path_factory.mktemp('run'))
  train_and_evaluate(schema.load(c, jax.device_count()), workdir)
  last = routing_report.read_metrics(workdir)[-1]
  for layer in (0, 1):
    assert sum(last[f'layer_{layer}/moe/expert_load']) == pytest.approx(1.0)
  cluster_load = np.asarray(last['layer_1/routing/cluster_load'])
  assert cluster_load.shape == (2, 4) and np.allclose(cluster_load.sum(1), 1.0)
  result = subprocess.run(
    [sys.executable, '-m', 'eval.routing_report', f'--workdir={workdir}'],
    cwd=REPO,
    capture_output=True,
    text=True,
    timeout=300,
    env={**os.environ, 'JAX_PLATFORMS': 'cpu'},
  )
  assert result.returncode == 0, result.stderr[-2000:]
  data = json.loads(result.stdout.strip().splitlines()[-1])
  out = os.path.join(workdir, 'report')
  assert result.stdout.strip().splitlines()[-2] == os.path.join(out, 'routing_report.md')
  assert [p['file'] for p in data['plots']] == ALL_PLOTS
  _assert_pngs(out, ALL_PLOTS)
  assert data['checkpoint']['step'] == 16
  assert set(data['checkpoint']['coupling_level']) == {'0', '1'}
  for n in (8, 32):  # local routing consistency of every MoE layer on held-out text
    hits = data['checkpoint'][f'segment_cache_hit_{n}']
    assert set(hits) == {'0', '1'} and all(0.0 <= v <= 1.0 for v in hits.values())
  assert data['heldout_loss'] is not None and data['triggers_monitored'] == 2
