"""`python -m eval.routing_report --workdir=DIR [--out=DIR/report] [--step=N] [--nocheckpoint]`.

The routing of one run over training, in plots and tables. Reads DIR/config.json (what the run
has), DIR/metrics.jsonl (training and held-out records) and restores one checkpoint (the newest,
or `--step`) for the per-layer metrics that need weights: the ERC coupling level alpha* of every
MoE layer, and its local routing consistency on held-out text: the Segment Cache Hit, the share
of 8- and 32-token segments whose experts fit a cache of 2·top_k experts (eval/segment_cache.py). Writes to OUT (default DIR/report) only the plots the run has data for:
- `loss.png`: training loss (and lm_loss where the auxiliary losses make it differ), held-out points;
- `expert_load.png`: per MoE layer, each expert's share of the assignments over steps relative to
  uniform (1 = balanced; from `layer_i/moe/expert_load`);
- `dead_experts.png`: dead experts and load CV per MoE layer over steps;
- `entropy.png`: H_tok, H_use, the trigger's EMA of H_tok and the ramp weight per MoE layer, trigger
  steps marked (docs/methods.md §4); `trigger_timeline.png`: each monitored layer's coverage regime,
  ramp and specialisation regime over steps (runs with `entropy.enabled`);
- `cluster_occupancy.png`: per routing-attention layer, the k-means cluster shares over steps (mean
  over heads, from `layer_i/routing/cluster_load`) and occupancy min/max and unpicked fraction;
- `uoe_gates.png`: per Union-of-Experts gate (SMHA heads, UoME experts) and layer, load CV,
  unselected and dropped token fractions and gate entropy over steps;
- `coupling.png`: alpha* per MoE layer over training (logged when ERC is on), the checkpoint's
  values and the alpha = 1 line;
- `routing_report.md` (summary, plots with captions, per-layer tables) and `routing_report.json`
  (the same data: what `report` returns). A dense run gets `loss.png` and the tables.
Plots are drawn by eval/report_plots.py; this module extracts the data. DIR and OUT may be local
or gs://BUCKET/PATH (everything is read and written through `data.storage`).
"""

import json
import math
import re
import sys

import numpy as np
from absl import app, flags

from configs import cli, schema
from data import storage
from eval import report_markdown
from train.metrics import read_eval_metrics, read_metrics  # public here too, as before

_LAYER = re.compile(r'^layer_(\d+)/(\w+)/(.+)$')
ROUTING_CURVES = ('occupancy_min', 'occupancy_max', 'unpicked_fraction')
MOE_HEALTH = ('load_cv', 'load_max_mean', 'dead_experts')
UOE_GATES = ('attn', 'mlp')  # SMHA head gate, UoME expert gate: metrics layer_i/uoe/<gate>_<name>
UOE_HEALTH = ('load_cv', 'unselected_fraction', 'dropped_fraction', 'gate_entropy')
markdown_table = (
  report_markdown.markdown_table
)  # the entropy table; a public name since the first report


def read_config(workdir: str) -> dict:
  """DIR/config.json as a plain dict (no jax); a one-line error if it is missing or unreadable."""
  path = storage.join(workdir, 'config.json')
  if not storage.exists(path):
    raise FileNotFoundError(
      f'{path} not found: --workdir must be a directory written by train.train'
    )
  try:
    return storage.read_json(path)
  except ValueError as e:
    raise ValueError(f'{path}: not valid JSON ({e})') from None


def layer_plan(config: dict):
  """The layer plan (`model.plan.ModelPlan`) of the run whose DIR/config.json is `config`."""
  from model import plan  # pylint: disable=g-import-not-at-top  (model code is heavy)

  return plan.build(schema.from_dict(config).model)


def run_features(config: dict) -> dict[str, bool]:
  """Which routed mechanisms the run's layers have (from the layer plan): moe, erc, entropy
  (trigger, in MoE layers), routing_attention, uoe (SMHA and/or UoME layers)."""
  specs = layer_plan(config).specs
  is_moe = any(s.feed_forward == 'moe' for s in specs)
  return {
    'moe': is_moe,
    'erc': is_moe and config.get('moe', {}).get('erc_weight', 0) > 0,
    'entropy': is_moe and bool(config.get('entropy', {}).get('enabled')),
    'routing_attention': any(s.attention == 'routing' for s in specs),
    'uoe': any(s.attention == 'smha' or s.feed_forward == 'uome' for s in specs),
  }


def series(records: list[dict], name: str, kind: str = 'moe') -> dict[int, tuple[list, list]]:
  """{layer: (steps, values)} of the per-layer metric `layer_i/<kind>/<name>` (kind: moe,
  routing, uoe)."""
  return _per_layer_index(records).get((kind, name), {})


_INDEXED: list = [None, 0, {}]  # the records last indexed, their length, their index


def _per_layer_index(records: list[dict]) -> dict[tuple[str, str], dict[int, tuple[list, list]]]:
  """{(kind, name): {layer: (steps, values)}} of every per-layer metric, parsed in one pass over
  the records. The report asks for dozens of metrics of the same records, so the index of the
  last records seen is kept (one entry; rebuilt when the list or its length changes)."""
  if _INDEXED[0] is records and _INDEXED[1] == len(records):
    return _INDEXED[2]
  index: dict[tuple[str, str], dict[int, tuple[list, list]]] = {}
  for r in records:
    for key, value in r.items():
      m = _LAYER.match(key)
      if m:
        steps, values = index.setdefault((m.group(2), m.group(3)), {}).setdefault(
          int(m.group(1)), ([], [])
        )
        steps.append(r['step'])
        values.append(value)
  index = {metric: dict(sorted(layers.items())) for metric, layers in index.items()}
  _INDEXED[:] = [records, len(records), index]
  return index


def share_series(records: list[dict], name: str, kind: str) -> dict[int, tuple[list, np.ndarray]]:
  """{layer: (steps, share_TX)} of a vector metric (`expert_load` [E]; `cluster_load` [H][N] is
  averaged over heads): one row of shares per logged step."""
  out = {}
  for layer, (steps, values) in series(records, name, kind).items():
    share = np.asarray(values, np.float64)
    out[layer] = (steps, share.mean(1) if share.ndim == 3 else share)
  return out


def trigger_steps(records: list[dict]) -> dict[int, int | None]:
  """Each monitored layer's trigger step (None if it has not fired), from the last record."""
  return {
    layer: (int(values[-1]) if values[-1] >= 0 else None)
    for layer, (_, values) in series(records, 'trigger_step').items()
  }


def trigger_phases(records: list[dict], ramp_steps: int) -> dict[int, list[tuple[str, int, int]]]:
  """Per monitored layer, [(phase, start, end)] over the logged steps: coverage until the trigger,
  then the ramp (`ramp_steps`), then specialisation; only coverage if it has not fired."""
  if not records:
    return {}
  first, last = records[0]['step'], records[-1]['step']
  out = {}
  for layer, fired in trigger_steps(records).items():
    if fired is None:
      out[layer] = [('coverage', first, last)]
      continue
    ramp_end = min(fired + ramp_steps, last)
    out[layer] = [('coverage', first, fired), ('ramp', fired, ramp_end)]
    if ramp_end < last:
      out[layer].append(('specialisation', ramp_end, last))
  return out


def _at_or_before(steps_values, step):
  steps, values = steps_values
  picked = [v for s, v in zip(steps, values) if s <= step]
  return picked[-1] if picked else math.nan


def summary(records: list[dict]) -> dict[int, dict]:
  """Per MoE layer: trigger step, entropies before the trigger and at the end, final balance."""
  if not records:
    return {}
  h_tok, h_use = series(records, 'h_tok'), series(records, 'h_use')
  triggers, last = trigger_steps(records), records[-1]
  out = {}
  for layer in sorted(h_tok):
    fired = triggers.get(layer)
    row = {
      'trigger_step': fired,
      'final_step': last['step'],
      'h_tok_final': h_tok[layer][1][-1],
      'h_use_final': h_use[layer][1][-1],
    }
    if fired is not None:
      row['h_tok_at_trigger'] = _at_or_before(h_tok[layer], fired)
      row['h_use_at_trigger'] = pre = _at_or_before(h_use[layer], fired)
      row['h_use_change'] = (row['h_use_final'] - pre) / pre if pre == pre and pre else math.nan
    for name in MOE_HEALTH:
      key = f'layer_{layer}/moe/{name}'
      if key in last:
        row[name] = last[key]
    out[layer] = row
  return out


def _final_per_layer(records: list[dict], names: tuple[str, ...], kind: str) -> dict[int, dict]:
  """{layer: {name: value in the last record that has it}} of `layer_i/<kind>/<name>`."""
  out: dict[int, dict] = {}
  for name in names:
    for layer, (_, values) in series(records, name, kind).items():
      out.setdefault(layer, {})[name] = values[-1]
  return dict(sorted(out.items()))


def checkpoint_summary(workdir: str, step: int | None = None) -> dict:
  """Per-layer metrics that need the weights, from one checkpoint (newest, or `step`) restored on
  one device: {'step': N, METRIC: {layer: value}, ...}. Every key but 'step' is one per-layer
  metric; the report renders each as a column of its checkpoint table: `coupling_level` (ERC alpha*
  of every MoE layer, ERC-trained or not) and, on the first held-out batches, the segment cache
  hit and best hit rate for segments of 8 and 32 tokens and the experts per token
  (eval/segment_cache.py)."""
  from eval import evaluate, segment_cache  # pylint: disable=g-import-not-at-top

  if not storage.isdir(storage.join(workdir, 'checkpoints')):
    raise FileNotFoundError(
      f'no complete checkpoint in {storage.join(workdir, "checkpoints")}: '
      'the report restores one for alpha* and the segment cache hit '
      '(--nocheckpoint skips it)'
    )
  cfg, step, model = evaluate.restore_model(workdir, step)
  per_layer: dict[str, dict[int, float]] = {}
  for key, value in evaluate.coupling_levels(model).items():
    m = _LAYER.match(key)
    per_layer.setdefault(m.group(3), {})[int(m.group(1))] = value
  if cfg.model.moe.num_experts:
    cache = segment_cache.heldout_segment_cache(cfg, model)
    for layer, metrics in cache['layers'].items():
      for name, value in metrics.items():
        per_layer.setdefault(name, {})[layer] = value
  return {'step': step, **per_layer}


def build(
  workdir: str, config: dict, records: list[dict], heldout: list[dict], checkpoint: dict
) -> dict:
  """Everything the report states, as JSON-able data: features, final values, per-layer tables."""
  features, last = run_features(config), records[-1]
  moe_rows = _final_per_layer(records, MOE_HEALTH, 'moe')
  routing_rows = _final_per_layer(records, ROUTING_CURVES, 'routing')
  uoe_rows = _final_per_layer(
    records, tuple(f'{g}_{n}' for g in UOE_GATES for n in UOE_HEALTH), 'uoe'
  )
  for layer, level in checkpoint.get('coupling_level', {}).items():
    moe_rows.setdefault(layer, {})['coupling_level_at_checkpoint'] = level
  triggers = trigger_steps(records) if features['entropy'] else {}
  dead = [r['dead_experts'] for r in moe_rows.values() if 'dead_experts' in r]
  load_cv = [r['load_cv'] for r in moe_rows.values() if 'load_cv' in r]
  return {
    'workdir': workdir,
    'features': features,
    'final_step': last['step'],
    'final_loss': last['loss'],
    'final_lm_loss': last.get('lm_loss'),
    'heldout_loss': heldout[-1]['eval_loss'] if heldout else None,
    'heldout_step': heldout[-1]['step'] if heldout else None,
    'heldout_evaluation': heldout[-1].get('eval_evaluation', 'teacher_forced') if heldout else None,
    'dead_experts_total': sum(dead) if dead else None,
    'mean_load_cv': float(np.mean(load_cv)) if load_cv else None,
    'triggers_fired': sum(s is not None for s in triggers.values()),
    'triggers_monitored': len(triggers),
    'checkpoint': checkpoint,
    'layers': {
      'plan': {
        layer.index: {
          'attention': layer.spec.attention,
          'feed_forward': layer.spec.feed_forward,
          'description': layer.description,
        }
        for layer in layer_plan(config).layers
      },
      'entropy': summary(records) if features['moe'] else {},
      'moe': moe_rows,
      'routing': routing_rows,
      'uoe': uoe_rows,
    },
  }


def plot_all(
  config: dict,
  records: list[dict],
  heldout: list[dict],
  checkpoint: dict,
  out: str,
  title: str = '',
) -> list[dict]:
  """Draws the plots the run has data for; [{'file', 'caption'}] in report order."""
  from eval import report_plots as plots  # pylint: disable=g-import-not-at-top

  features, entropy_config = run_features(config), config.get('entropy', {})
  made = []

  def add(name, draw, *args, **kwargs):
    draw(*args, storage.join(out, name), title=title, **kwargs)
    made.append({'file': name, 'caption': report_markdown.CAPTIONS[name]})

  steps = [r['step'] for r in records]
  train = {'loss': (steps, [r['loss'] for r in records])}
  if any(abs(r.get('lm_loss', r['loss']) - r['loss']) > 1e-9 for r in records):
    train['lm_loss'] = (steps, [r.get('lm_loss', math.nan) for r in records])
  add(
    'loss.png', plots.loss, train, ([r['step'] for r in heldout], [r['eval_loss'] for r in heldout])
  )
  if features['moe']:
    if loads := share_series(records, 'expert_load', 'moe'):
      add('expert_load.png', plots.load_heatmaps, loads, 'expert')
    if dead := series(records, 'dead_experts'):
      add('dead_experts.png', plots.dead_experts, dead, series(records, 'load_cv'))
    entropy = {name: series(records, name) for name, _ in plots.ENTROPY_PANELS}
    triggers = trigger_steps(records)
    if entropy['h_tok']:
      add(
        'entropy.png',
        plots.entropy,
        entropy,
        triggers,
        tau=entropy_config.get('tau') if features['entropy'] else None,
      )
    if features['entropy'] and triggers:
      add(
        'trigger_timeline.png',
        plots.trigger_timeline,
        trigger_phases(records, int(entropy_config.get('ramp_steps', 0))),
        triggers,
      )
  if features['routing_attention']:
    loads = share_series(records, 'cluster_load', 'routing')
    curves: dict[int, dict] = {}
    for name in ROUTING_CURVES:
      for layer, steps_values in series(records, name, 'routing').items():
        curves.setdefault(layer, {})[name] = steps_values
    if loads or curves:
      add('cluster_occupancy.png', plots.cluster_occupancy, loads, curves)
  if features['uoe']:
    gates = {f'{g}_{n}': series(records, f'{g}_{n}', 'uoe') for g in UOE_GATES for n in UOE_HEALTH}
    gates = {name: data for name, data in gates.items() if data}
    if gates:
      add('uoe_gates.png', plots.uoe_gates, gates)
  levels, at_checkpoint = series(records, 'coupling_level'), checkpoint.get('coupling_level', {})
  if features['moe'] and (levels or at_checkpoint):
    add('coupling.png', plots.coupling, levels, at_checkpoint, checkpoint.get('step'))
  return made


def report(
  workdir: str, out: str | None = None, step: int | None = None, checkpoint: bool = True
) -> dict:
  """Writes the plots, routing_report.md and routing_report.json of a run; returns the JSON data.

  `checkpoint=False` leaves out the checkpoint metrics (for a run without checkpoints)."""
  out = out or storage.join(workdir, 'report')
  config, records, heldout = read_config(workdir), read_metrics(workdir), read_eval_metrics(workdir)
  if not records:
    raise ValueError(
      f'{storage.join(workdir, "metrics.jsonl")} has no training records (with loss)'
    )
  ckpt = checkpoint_summary(workdir, step) if checkpoint else {}
  data = build(workdir, config, records, heldout, ckpt)
  data['plots'] = plot_all(
    config, records, heldout, ckpt, out, title=storage.basename(storage.resolve(workdir))
  )
  storage.write_json(storage.join(out, 'routing_report.json'), data, indent=2)
  storage.write_text(storage.join(out, 'routing_report.md'), report_markdown.render(data))
  return data


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  f = flags.FLAGS
  try:
    data = report(f.workdir, f.out, f.step, f.checkpoint)
  except (FileNotFoundError, ValueError) as e:  # ConfigError is a ValueError
    print(f'error: {e}', file=sys.stderr)
    sys.exit(1)
  print(storage.join(f.out or storage.join(f.workdir, 'report'), 'routing_report.md'))
  print(json.dumps(data))


def run():
  flags.DEFINE_string('workdir', None, 'Run directory written by train.train.')
  flags.DEFINE_string('out', None, 'Output directory; default: WORKDIR/report.')
  flags.DEFINE_integer('step', None, 'Checkpoint step for the checkpoint metrics; default: newest.')
  flags.DEFINE_bool(
    'checkpoint', True, 'Restore a checkpoint for alpha* (--nocheckpoint: metrics.jsonl only).'
  )
  flags.mark_flags_as_required(['workdir'])
  app.run(main, flags_parser=cli.parse_flags)


if __name__ == '__main__':
  run()
