"""routing_report.md from the report's data (eval.routing_report.build): summary, plots, tables."""

import math

# One line per plot: what it shows and what to look for.
CAPTIONS = {
  'loss.png': 'Training loss (lm_loss: without the auxiliary losses) and held-out eval_loss '
  'points: they should fall together; held-out points drifting above the curve '
  'mean overfitting or a data mismatch.',
  'expert_load.png': "Each expert's share of the assignments per logging window relative to "
  'uniform 1/E (white = balanced): a persistently red row is an overloaded '
  'expert, a dark blue row a starved or dead one.',
  'dead_experts.png': 'Experts that got no token in a logging window, and the load CV: both '
  'should fall towards 0; dead experts appearing after the trigger mean '
  'specialisation is starving experts.',
  'entropy.png': "Token entropy H_tok should fall after each layer's trigger (dashed) while "
  'usage entropy H_use stays near its pre-trigger value.',
  'trigger_timeline.png': 'When each monitored layer left the coverage regime: the trigger '
  '(triangle), the ramp of the specialisation weight, then '
  'specialisation; a layer that never fires stays in coverage.',
  'cluster_occupancy.png': 'k-means cluster shares per routing-attention layer (white = '
  'balanced; a dark blue row is an empty cluster), and occupancy '
  'min/max near 1 with a small unpicked fraction once the means move.',
  'uoe_gates.png': 'Union-of-Experts gates per layer: load CV should fall under the balance '
  'loss, and the unselected fraction (tokens no head / expert took) and '
  'dropped fraction (choices beyond capacity) stay well below 0.5.',
  'coupling.png': 'ERC coupling level alpha* per MoE layer (points: from the checkpoint '
  'weights): at most 1 (dotted line) means every router row and its expert are '
  'coupled; the ERC loss pushes it below its alpha, without it it stays above 1 '
  '(docs/results.md, "ERC loss").',
}
ENTROPY_COLUMNS = (
  'trigger_step',
  'h_tok_at_trigger',
  'h_tok_final',
  'h_use_at_trigger',
  'h_use_final',
  'h_use_change',
  'dead_experts',
  'load_max_mean',
)
PLAN_COLUMNS = ('attention', 'feed_forward', 'description')
MOE_COLUMNS = ('load_cv', 'load_max_mean', 'dead_experts', 'coupling_level_at_checkpoint')
ROUTING_COLUMNS = ('occupancy_min', 'occupancy_max', 'unpicked_fraction')
UOE_COLUMNS = tuple(
  f'{gate}_{name}'
  for gate in ('attn', 'mlp')
  for name in ('load_cv', 'unselected_fraction', 'dropped_fraction', 'gate_entropy')
)


def _cell(col: str, v) -> str:
  if v is None:
    return '-'
  if col == 'h_use_change':
    return f'{v:+.2%}'
  return f'{v:.4f}' if isinstance(v, float) else str(v)


def table(rows: dict[int, dict], columns) -> str:
  """A markdown table, one row per layer, of the `columns` that some row has."""
  cols = [c for c in columns if any(c in r for r in rows.values())]
  lines = ['| layer | ' + ' | '.join(cols) + ' |', '|---' * (len(cols) + 1) + '|']
  for layer, r in rows.items():
    lines.append(f'| {layer} | ' + ' | '.join(_cell(c, r.get(c)) for c in cols) + ' |')
  return '\n'.join(lines)


def markdown_table(rows: dict[int, dict]) -> str:
  """The per-layer entropy-trigger table of `routing_report.summary`."""
  return table(rows, ENTROPY_COLUMNS)


def checkpoint_rows(checkpoint: dict) -> dict[int, dict]:
  """{'step', METRIC: {layer: value}} -> {layer: {METRIC: value}}, every metric a column."""
  rows: dict[int, dict] = {}
  for metric, per_layer in checkpoint.items():
    if metric != 'step':
      for layer, value in per_layer.items():
        rows.setdefault(layer, {})[metric] = value
  return dict(sorted(rows.items()))


def _number(v, fmt: str = '.4f') -> str:
  return '-' if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, fmt)


def summary_paragraph(data: dict) -> str:
  parts = [f'{data["final_step"]} training steps; final train loss {_number(data["final_loss"])}']
  if data['final_lm_loss'] is not None and data['final_lm_loss'] != data['final_loss']:
    parts[-1] += f' (lm_loss {_number(data["final_lm_loss"])})'
  if data['heldout_loss'] is not None:
    parts.append(
      f'held-out loss {_number(data["heldout_loss"])} at step {data["heldout_step"]} '
      f'({data.get("heldout_evaluation") or "teacher_forced"})'
    )
  if data['dead_experts_total'] is not None:
    parts.append(
      f'{data["dead_experts_total"]} dead experts over all MoE layers in the last '
      f'logging window, mean load CV {_number(data["mean_load_cv"], ".3f")}'
    )
  if data['triggers_monitored']:
    parts.append(
      f'entropy trigger fired in {data["triggers_fired"]}/'
      f'{data["triggers_monitored"]} monitored layers'
    )
  levels = data['checkpoint'].get('coupling_level')
  if levels:
    parts.append(
      f'alpha* at checkpoint step {data["checkpoint"]["step"]}: '
      + ', '.join(f'layer {layer} {_number(v, ".3f")}' for layer, v in levels.items())
    )
  return '; '.join(parts) + '.'


def render(data: dict) -> str:
  """The whole routing_report.md."""
  lines = [f'# Routing report: {data["workdir"]}', '', summary_paragraph(data), '']
  for plot in data['plots']:
    name = plot['file'][: -len('.png')]
    lines += [f'![{name}]({plot["file"]})', '', f'*{plot["caption"]}*', '']
  sections = (
    ('Layers', data['layers'].get('plan', {}), PLAN_COLUMNS),
    ('Routing entropy and trigger', data['layers']['entropy'], ENTROPY_COLUMNS),
    ('MoE health (last logging window)', data['layers']['moe'], MOE_COLUMNS),
    ('Routing attention (last logging window)', data['layers']['routing'], ROUTING_COLUMNS),
    ('Union of Experts gates (last logging window)', data['layers'].get('uoe', {}), UOE_COLUMNS),
  )
  for title, rows, columns in sections:
    if rows:
      lines += [f'## {title}', '', table(rows, columns), '']
  at_checkpoint = checkpoint_rows(data['checkpoint'])
  if at_checkpoint:
    columns = sorted({c for r in at_checkpoint.values() for c in r})
    lines += [
      f'## At checkpoint step {data["checkpoint"]["step"]}',
      '',
      table(at_checkpoint, columns),
      '',
    ]
    if any(c.startswith('segment_cache_hit') for c in columns):
      lines += [
        '*segment_cache_hit_N: share of the held-out N-token segments whose tokens use '
        'at most 2·top_k distinct experts (the segment runs from a cache of that size); '
        "segment_best_hit_rate_N: share of a segment's expert activations served by its "
        '2·top_k most used experts, averaged. Higher = more local routing, cheaper '
        'expert offloading.*',
        '',
      ]
  return '\n'.join(lines)
