"""`python -m eval.routing_report --workdir=DIR [--out=DIR/report]`: per-layer routing over training.

Reads DIR/metrics.jsonl (no checkpoint, no jax) and writes to OUT:
- `entropy.png`: normalised token entropy H_tok, usage entropy H_use, the trigger's EMA of H_tok
  and the ramp weight per MoE layer over the steps, each layer's trigger step marked (entropy
  trigger, METHODS.md §4(a); runs without it get the two entropy panels);
- `routing_report.json` and `routing_report.md`: per layer, the trigger step, H_tok and H_use at
  the last logged step before the trigger and at the end, the relative change of H_use, and the
  final load balance and dead experts.
"""

import json
import math
import os
import re
import sys

from absl import app, flags

from configs import cli

_LAYER = re.compile(r'^layer_(\d+)/moe/(.+)$')
PANELS = (('h_tok', 'H_tok (token entropy / log E)'), ('h_use', 'H_use (usage entropy / log E)'),
          ('h_tok_ema', 'EMA of H_tok (trigger input)'), ('ramp_weight', 'ramp weight w'))


def read_metrics(workdir: str) -> list[dict]:
  """Training records of DIR/metrics.jsonl (those with a `loss`; held-out evaluation records
  have `eval_*` keys only), one per step (a resumed run's repeat wins), sorted."""
  path = os.path.join(workdir, 'metrics.jsonl')
  if not os.path.exists(path):
    raise FileNotFoundError(f'{path} not found: --workdir must be a directory written by train.train')
  by_step = {}
  with open(path) as f:
    for line in f:
      record = json.loads(line)
      if 'loss' in record:
        by_step[record['step']] = record
  return [by_step[s] for s in sorted(by_step)]


def series(records: list[dict], name: str) -> dict[int, tuple[list[int], list[float]]]:
  """{layer: (steps, values)} of the per-layer metric `layer_i/moe/<name>`."""
  out: dict[int, tuple[list[int], list[float]]] = {}
  for r in records:
    for key, value in r.items():
      m = _LAYER.match(key)
      if m and m.group(2) == name:
        steps, values = out.setdefault(int(m.group(1)), ([], []))
        steps.append(r['step'])
        values.append(value)
  return dict(sorted(out.items()))


def trigger_steps(records: list[dict]) -> dict[int, int | None]:
  """Each monitored layer's trigger step (None if it has not fired), from the last record."""
  return {layer: (int(values[-1]) if values[-1] >= 0 else None)
          for layer, (_, values) in series(records, 'trigger_step').items()}


def _at_or_before(steps_values, step):
  steps, values = steps_values
  picked = [v for s, v in zip(steps, values) if s <= step]
  return picked[-1] if picked else math.nan


def summary(records: list[dict]) -> dict[int, dict]:
  """Per layer: trigger step, entropies before the trigger and at the end, final balance."""
  if not records:
    return {}
  h_tok, h_use = series(records, 'h_tok'), series(records, 'h_use')
  triggers, last = trigger_steps(records), records[-1]
  out = {}
  for layer in sorted(h_tok):
    fired = triggers.get(layer)
    row = {'trigger_step': fired, 'final_step': last['step'],
           'h_tok_final': h_tok[layer][1][-1], 'h_use_final': h_use[layer][1][-1]}
    if fired is not None:
      row['h_tok_at_trigger'] = _at_or_before(h_tok[layer], fired)
      row['h_use_at_trigger'] = pre = _at_or_before(h_use[layer], fired)
      row['h_use_change'] = (row['h_use_final'] - pre) / pre if pre == pre and pre else math.nan
    for name in ('dead_experts', 'load_max_mean', 'load_cv'):
      key = f'layer_{layer}/moe/{name}'
      if key in last:
        row[name] = last[key]
    out[layer] = row
  return out


def plot(records: list[dict], path: str, title: str = '', tau: float | None = None) -> str:
  """Writes the entropy panels (those with data) as a PNG and returns its path; `tau` (the
  trigger threshold) is drawn on the EMA panel."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  panels = [(name, label, series(records, name)) for name, label in PANELS]
  panels = [p for p in panels if p[2]]
  if not panels:
    raise ValueError('no per-layer entropy metrics (layer_i/moe/h_tok) in metrics.jsonl: not an MoE run')
  triggers = trigger_steps(records)
  cols = 2
  rows = -(-len(panels) // cols)
  fig, axs = plt.subplots(rows, cols, figsize=(6 * cols, 3.4 * rows), squeeze=False)
  colors = plt.rcParams['axes.prop_cycle'].by_key()['color']
  for ax, (name, label, data) in zip(axs.flat, panels):
    for layer, (steps, values) in data.items():
      color = colors[layer % len(colors)]
      ax.plot(steps, values, color=color, label=f'layer {layer}')
      if triggers.get(layer) is not None:
        ax.axvline(triggers[layer], color=color, linestyle='--', linewidth=0.8)
    if name == 'h_tok_ema' and tau is not None:
      ax.axhline(tau, color='k', linestyle=':', linewidth=0.8, label='tau')
    ax.set_title(label)
    ax.set_xlabel('step')
    ax.grid(alpha=0.3)
  axs.flat[0].legend(fontsize=8)
  for ax in list(axs.flat)[len(panels):]:
    ax.axis('off')
  if title:
    fig.suptitle(title + '  (dashed: trigger steps)')
  fig.tight_layout()
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  fig.savefig(path, dpi=110)
  plt.close(fig)
  return path


def _cell(col: str, v) -> str:
  if v is None:
    return '-'
  if col == 'h_use_change':
    return f'{v:+.2%}'
  return f'{v:.4f}' if isinstance(v, float) else str(v)


def markdown_table(rows: dict[int, dict]) -> str:
  cols = ['trigger_step', 'h_tok_at_trigger', 'h_tok_final', 'h_use_at_trigger', 'h_use_final',
          'h_use_change', 'dead_experts', 'load_max_mean']
  cols = [c for c in cols if any(c in r for r in rows.values())]
  lines = ['| layer | ' + ' | '.join(cols) + ' |', '|---' * (len(cols) + 1) + '|']
  for layer, r in rows.items():
    lines.append(f'| {layer} | ' + ' | '.join(_cell(c, r.get(c)) for c in cols) + ' |')
  return '\n'.join(lines)


def _tau(workdir: str) -> float | None:
  """The run's entropy.tau from DIR/config.json when the trigger was on."""
  try:
    with open(os.path.join(workdir, 'config.json')) as f:
      entropy = json.load(f).get('entropy', {})
  except (OSError, ValueError):
    return None
  return entropy.get('tau') if entropy.get('enabled') else None


def report(workdir: str, out: str | None = None) -> dict:
  """Writes the plot and the tables of a run; returns the per-layer summary."""
  out = out or os.path.join(workdir, 'report')
  records = read_metrics(workdir)
  rows = summary(records)
  os.makedirs(out, exist_ok=True)
  plot(records, os.path.join(out, 'entropy.png'), title=os.path.basename(os.path.normpath(workdir)),
       tau=_tau(workdir))
  with open(os.path.join(out, 'routing_report.json'), 'w') as f:
    json.dump({str(k): v for k, v in rows.items()}, f, indent=2)
  with open(os.path.join(out, 'routing_report.md'), 'w') as f:
    f.write(f'# Routing report: {workdir}\n\n![entropy](entropy.png)\n\n{markdown_table(rows)}\n')
  return rows


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  f = flags.FLAGS
  try:
    rows = report(f.workdir, f.out)
  except (FileNotFoundError, ValueError) as e:
    print(f'error: {e}', file=sys.stderr)
    sys.exit(1)
  print(markdown_table(rows))
  print(json.dumps({str(k): v for k, v in rows.items()}))


def run():
  flags.DEFINE_string('workdir', None, 'Run directory written by train.train.')
  flags.DEFINE_string('out', None, 'Output directory; default: WORKDIR/report.')
  flags.mark_flags_as_required(['workdir'])
  app.run(main, flags_parser=cli.parse_flags)


if __name__ == '__main__':
  run()
