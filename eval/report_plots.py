"""The routing report's figures: one function per PNG, from data that eval.routing_report extracts.

Each takes plain Python/numpy data and a location (a local path or gs://..., written through
`data.storage`), renders the PNG with matplotlib's Agg backend and returns the location.
matplotlib is imported inside the functions, so importing this module (and the report) stays
cheap.
"""

import numpy as np

from data import storage

Series = dict[int, tuple[list[int], list[float]]]  # {layer: (steps, values)}
ENTROPY_PANELS = (
  ('h_tok', 'H_tok (token entropy / log E)'),
  ('h_use', 'H_use (usage entropy / log E)'),
  ('h_tok_ema', 'EMA of H_tok (trigger input)'),
  ('ramp_weight', 'ramp weight w'),
)
PHASE_COLORS = {'coverage': '#8fb8de', 'ramp': '#f2c14e', 'specialisation': '#d1495b'}


def _pyplot():
  import matplotlib  # pylint: disable=g-import-not-at-top

  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  return plt


def _grid(plt, panels: int, cols: int, width: float = 6.0, height: float = 3.4):
  rows = -(-panels // cols)
  fig, axs = plt.subplots(rows, cols, figsize=(width * cols, height * rows), squeeze=False)
  for ax in list(axs.flat)[panels:]:
    ax.axis('off')
  return fig, list(axs.flat)


def _save(plt, fig, path: str, title: str = '') -> str:
  if title:
    fig.suptitle(title)
  fig.tight_layout()
  storage.write_figure(fig, path, dpi=110)
  plt.close(fig)
  return path


def _color(plt, layer: int) -> str:
  colors = plt.rcParams['axes.prop_cycle'].by_key()['color']
  return colors[layer % len(colors)]


def _edges(steps: list[int]) -> np.ndarray:
  """Cell edges for pcolormesh: each logged value covers its window (previous step, step]."""
  s = np.asarray(steps, np.float64)
  first_window = s[1] - s[0] if len(s) > 1 else 1.0
  return np.concatenate([[max(s[0] - first_window, 0.0)], s])


def _layer_lines(plt, ax, data: Series, label: str, **kwargs) -> None:
  for layer, (steps, values) in data.items():
    ax.plot(steps, values, color=_color(plt, layer), label=f'layer {layer}', **kwargs)
  ax.set_title(label)
  ax.set_xlabel('step')
  ax.grid(alpha=0.3)


def loss(
  train: dict[str, tuple[list[int], list[float]]],
  heldout: tuple[list[int], list[float]],
  path: str,
  title: str = '',
) -> str:
  """Training curves ({name: (steps, values)}, e.g. loss and lm_loss) and held-out points."""
  plt = _pyplot()
  fig, (ax,) = _grid(plt, 1, 1, width=7.0, height=4.0)
  for name, (steps, values) in train.items():
    ax.plot(steps, values, label=f'train {name}')
  if heldout[0]:
    ax.plot(*heldout, 'o', color='k', label='held-out eval_loss')
  ax.set_xlabel('step')
  ax.set_ylabel('cross-entropy (nats/token)')
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8)
  return _save(plt, fig, path, title)


def load_heatmaps(
  loads: dict[int, tuple[list[int], np.ndarray]], what: str, path: str, title: str = ''
) -> str:
  """One panel per layer: share of each row item (expert or cluster) over steps, relative to
  uniform (share * count), on a diverging colormap centred at 1. `loads`: {layer: (steps, share_TX)}."""
  plt = _pyplot()
  fig, axs = _grid(plt, len(loads), 1, width=8.0, height=2.8)
  for ax, (layer, (steps, share_TX)) in zip(axs, loads.items()):
    _share_heatmap(fig, ax, steps, share_TX, what)
    ax.set_title(f'layer {layer}')
  return _save(plt, fig, path, title)


def _share_heatmap(fig, ax, steps: list[int], share_TX: np.ndarray, what: str) -> None:
  """Shares relative to uniform (share * X), white at 1, red above, blue below."""
  from matplotlib.colors import TwoSlopeNorm  # pylint: disable=g-import-not-at-top

  relative_XT = (share_TX * share_TX.shape[1]).T
  norm = TwoSlopeNorm(vcenter=1.0, vmin=0.0, vmax=max(2.0, float(relative_XT.max())))
  mesh = ax.pcolormesh(
    _edges(steps), np.arange(relative_XT.shape[0] + 1) - 0.5, relative_XT, cmap='RdBu_r', norm=norm
  )
  fig.colorbar(mesh, ax=ax, label='share / uniform')
  from matplotlib.ticker import MaxNLocator  # pylint: disable=g-import-not-at-top

  ax.yaxis.set_major_locator(MaxNLocator(integer=True))
  ax.set_xlabel('step')
  ax.set_ylabel(what)


def entropy(
  series: dict[str, Series],
  triggers: dict[int, int | None],
  path: str,
  title: str = '',
  tau: float | None = None,
) -> str:
  """The entropy panels that have data ({metric name: series}), trigger steps dashed, `tau` on
  the EMA panel."""
  plt = _pyplot()
  panels = [(name, label, series[name]) for name, label in ENTROPY_PANELS if series.get(name)]
  if not panels:
    raise ValueError(
      'no per-layer entropy metrics (layer_i/moe/h_tok) in metrics.jsonl: not an MoE run'
    )
  fig, axs = _grid(plt, len(panels), 2)
  for ax, (name, label, data) in zip(axs, panels):
    _layer_lines(plt, ax, data, label)
    for layer, step in triggers.items():
      if step is not None and layer in data:
        ax.axvline(step, color=_color(plt, layer), linestyle='--', linewidth=0.8)
    if name == 'h_tok_ema' and tau is not None:
      ax.axhline(tau, color='k', linestyle=':', linewidth=0.8, label='tau')
  axs[0].legend(fontsize=8)
  return _save(plt, fig, path, title + '  (dashed: trigger steps)' if title else '')


def trigger_timeline(
  phases: dict[int, list[tuple[str, int, int]]],
  triggers: dict[int, int | None],
  path: str,
  title: str = '',
) -> str:
  """Per monitored layer, the regimes as horizontal bars over steps ({layer: [(phase, start,
  end)]}: coverage, ramp, specialisation), trigger steps marked."""
  plt = _pyplot()
  fig, (ax,) = _grid(plt, 1, 1, width=8.0, height=1.0 + 0.5 * len(phases))
  for row, (layer, spans) in enumerate(phases.items()):
    for phase, start, end in spans:
      ax.broken_barh(
        [(start, max(end - start, 0.5))], (row - 0.35, 0.7), color=PHASE_COLORS[phase], label=phase
      )
    if triggers.get(layer) is not None:
      ax.plot([triggers[layer]], [row], 'kv', label='trigger')
  handles = dict(zip(*ax.get_legend_handles_labels()[::-1]))  # one legend entry per label
  ax.legend(
    list(handles.values()), list(handles), fontsize=8, loc='upper left', bbox_to_anchor=(1.0, 1.0)
  )
  ax.set_yticks(range(len(phases)), [f'layer {layer}' for layer in phases])
  ax.set_ylim(-0.6, len(phases) - 0.4)
  ax.invert_yaxis()
  ax.set_xlabel('step')
  ax.grid(alpha=0.3, axis='x')
  return _save(plt, fig, path, title)


def dead_experts(dead: Series, load_cv: Series, path: str, title: str = '') -> str:
  """Dead experts (no token in a logging window) and the load coefficient of variation per layer."""
  plt = _pyplot()
  fig, axs = _grid(plt, 2, 2)
  _layer_lines(plt, axs[0], dead, 'dead experts per logging window', drawstyle='steps-post')
  _layer_lines(plt, axs[1], load_cv, 'load CV (std / mean of expert load)')
  axs[0].set_ylim(bottom=-0.2)
  axs[0].legend(fontsize=8)
  return _save(plt, fig, path, title)


def cluster_occupancy(
  loads: dict[int, tuple[list[int], np.ndarray]],
  curves: dict[int, dict[str, tuple[list[int], list[float]]]],
  path: str,
  title: str = '',
) -> str:
  """Per routing-attention layer: a heatmap of the k-means cluster shares (mean over heads,
  relative to uniform) over steps, and the occupancy/unpicked curves ({layer: {name: series}})."""
  plt = _pyplot()
  layers = sorted(set(loads) | set(curves))
  fig, axs = _grid(plt, 2 * len(layers), 2)
  for row, layer in enumerate(layers):
    heat_ax, curve_ax = axs[2 * row], axs[2 * row + 1]
    if layer in loads:
      _share_heatmap(fig, heat_ax, *loads[layer], 'cluster')
    else:
      heat_ax.axis('off')
    heat_ax.set_title(f'layer {layer}: cluster shares (mean over heads)')
    for name, (steps, values) in curves.get(layer, {}).items():
      curve_ax.plot(steps, values, label=name)
    curve_ax.axhline(1.0, color='k', linestyle=':', linewidth=0.8)
    curve_ax.set_title(f'layer {layer}: occupancy (1 = balanced) and unpicked fraction')
    curve_ax.set_xlabel('step')
    curve_ax.grid(alpha=0.3)
    curve_ax.legend(fontsize=8)
  return _save(plt, fig, path, title)


def coupling(
  levels: Series,
  at_checkpoint: dict[int, float],
  checkpoint_step: int | None,
  path: str,
  title: str = '',
) -> str:
  """ERC coupling level alpha* per MoE layer over training, the checkpoint's values as points,
  and the alpha = 1 line (below it, every expert is excited by its own router row more than by
  any other, and each router row excites its own expert most)."""
  plt = _pyplot()
  fig, (ax,) = _grid(plt, 1, 1, width=7.0, height=4.0)
  _layer_lines(plt, ax, levels, 'ERC coupling level alpha*')
  if checkpoint_step is not None:
    for layer, value in at_checkpoint.items():
      ax.plot([checkpoint_step], [value], 'o', color=_color(plt, layer))
  ax.axhline(1.0, color='k', linestyle=':', linewidth=0.8, label='alpha = 1')
  ax.legend(fontsize=8)
  return _save(plt, fig, path, title)


def uoe_gates(gates: dict[str, Series], path: str, title: str = '') -> str:
  """One panel per Union-of-Experts gate metric (`attn_load_cv`, `mlp_unselected_fraction`, ...),
  a line per layer: SMHA (attn) and UoME (mlp) gates side by side."""
  plt = _pyplot()
  names = sorted(gates, key=lambda n: (n.split('_', 1)[1], n))  # same metric, attn then mlp
  fig, axs = _grid(plt, len(names), 2)
  for ax, name in zip(axs, names):
    gate, metric = name.split('_', 1)
    _layer_lines(
      plt,
      ax,
      gates[name],
      f'{"SMHA heads" if gate == "attn" else "UoME experts"}: {metric.replace("_", " ")}',
    )
  axs[0].legend(fontsize=8)
  return _save(plt, fig, path, title)
