"""The study: every routing method side by side at equal active parameters, tokens and seeds.

Each method is its experiment config (configs/*.py: router, score, losses as published there) at one
shared size: 4 layers of width 128 with 4 heads, MLP width 384 or its routed equivalent (8 experts
of 192, top-2 / capacity 2; UoE: SMHA with 2 of 4 heads per token and a UoME of 4 experts of 232,
2 per token, so its average active weights match), sequence 256, the same batches, steps,
learning-rate schedule and seeds. Every run trains in ROOT/METHOD/seed_S (an interrupted study
resumes: finished runs are skipped, a half-finished one resumes from its checkpoint), is evaluated
from its final checkpoint on the held-out split, and the table (mean ± standard deviation over the
seeds) goes to benchmarks/results/study.json and the "Study" section of docs/results.md, with
docs/study.png.

Usage: python -m benchmarks.study [--steps=200] [--seeds=3] [--methods=dense,moe_topk,...]
       [--root=runs/study]
"""

import math
import os
import statistics

import jax
from absl import app, flags

from benchmarks import common
from configs import (demo, moe_entropy, moe_erc, moe_expert_choice, moe_lossfree, moe_topk,
                     routing_transformer, schema, uoe)
from eval import evaluate, routing_report
from model.transformer import active_params, count_params
from train import sweep
from train.train import train_and_evaluate

_STEPS = flags.DEFINE_integer('steps', 200, 'Training steps of every run.')
_SEEDS = flags.DEFINE_integer('seeds', 3, 'Seeds per method (train.seed = 0 .. N-1).')
_BATCH = flags.DEFINE_integer('batch_size', 8, 'Global batch in sequences of 256 tokens.')
_METHODS = flags.DEFINE_list('methods', None, 'Subset of the methods; default: all.')
_ROOT = flags.DEFINE_string('root', 'runs/study', 'Directory of the runs.')
_DOCS = flags.DEFINE_bool('docs', True, 'Write the Study section of docs/results.md.')


def _moe(module):
  def make():
    c = module.get_config()
    c.moe.update(num_experts=8, expert_dim=192, block_size=128)
    return c
  return make


def _routing_attention():
  c = routing_transformer.get_config()
  c.attention.update(routing_layers=(-2, -1), window=64, local_window=64)  # 4 clusters of 64
  return c


def _uoe():
  c = uoe.get_config()
  c.model.update(mlp_dim=928)  # 4 experts of 232, 2 per token: average active weights = dense's
  return c


def _entropy():
  c = _moe(moe_entropy)()
  # The trigger scaled to a short run, as in benchmarks/entropy_evidence.py (docs/results.md).
  c.entropy.update(tau=0.95, plateau=2e-3, plateau_window=50, ramp_steps=30, beta_tok=1e-2)
  return c


METHODS = {
    'dense': lambda: demo.get_config('dense'),
    'moe_topk': _moe(moe_topk),
    'moe_lossfree': _moe(moe_lossfree),
    'moe_expert_choice': _moe(moe_expert_choice),
    'moe_erc': _moe(moe_erc),
    'moe_entropy': _entropy,
    'routing_attention': _routing_attention,
    'uoe': _uoe,
}


def config(method: str, seed: int) -> schema.Config:
  """`method`'s experiment config at the study's shared size, schedule and data."""
  c = METHODS[method]()
  c.model.update(num_layers=4, d_model=128, num_heads=4, num_kv_heads=4, dtype='float32',
                 remat='none')
  if method != 'uoe':
    c.model.mlp_dim = 384
  c.train.update(steps=_STEPS.value, batch_size=_BATCH.value, seq_len=256, seed=seed,
                 log_every=max(_STEPS.value // 10, 1), peak_tflops=0.0)
  c.optimizer.update(learning_rate=3e-3, warmup_steps=max(_STEPS.value // 10, 1))
  c.checkpoint.update(every_steps=_STEPS.value)
  c.eval.update(batch_size=16, max_batches=20, every_steps=0)
  c.mesh.update(shape=(-1, 1, 1, 1), rules='dp')
  return schema.load(c, len(jax.devices()))


def _layer_mean(record: dict, suffixes: tuple[str, ...]) -> float:
  values = [v for k, v in record.items() if k.startswith('layer_') and k.endswith(suffixes)]
  return statistics.fmean(values) if values else math.nan


def run_one(method: str, seed: int) -> dict:
  """Trains (or resumes, or skips) one run and measures it from its checkpoint and metrics."""
  cfg, workdir = config(method, seed), os.path.join(_ROOT.value, method, f'seed_{seed}')
  if not sweep.finished(workdir, cfg.train.steps):
    train_and_evaluate(cfg, workdir)
  result = evaluate.evaluate_checkpoint(workdir)
  records = routing_report.read_metrics(workdir)
  speeds = [r['tokens_per_sec'] for r in records[1:]]  # the first window includes compilation
  last = records[-1]
  return {
      'method': method, 'seed': seed, 'bits_per_byte': result['bits_per_byte'],
      'heldout_loss': result['loss'], 'train_loss': last['loss'],
      'tokens_per_sec': statistics.median(speeds) if speeds else math.nan,
      'active_params': active_params(cfg.model, cfg.train.seq_len),
      'total_params': count_params(cfg.model),
      'load_cv': _layer_mean(last, ('/moe/load_cv', '/uoe/mlp_load_cv')),
      'dead_experts': sum(v for k, v in last.items() if k.endswith('/dead_experts')),
      'alpha_star': statistics.fmean(v for k, v in result.items()
                                     if k.endswith('/coupling_level')) if any(
                                         k.endswith('/coupling_level') for k in result) else math.nan,
  }


def summarise(runs: list[dict]) -> list[dict]:
  """Per method: mean and standard deviation over seeds of each measured column."""
  out = []
  for method in dict.fromkeys(r['method'] for r in runs):
    rows = [r for r in runs if r['method'] == method]
    row = {'method': method, 'seeds': len(rows)}
    for key in ('bits_per_byte', 'heldout_loss', 'tokens_per_sec', 'load_cv', 'dead_experts',
                'alpha_star'):
      values = [r[key] for r in rows]
      row[key] = statistics.fmean(values)
      row[key + '_sd'] = statistics.stdev(values) if len(values) > 1 else math.nan
    row['active_params'], row['total_params'] = rows[0]['active_params'], rows[0]['total_params']
    out.append(row)
  return out


def _pm(mean: float, sd: float, digits: int) -> str:
  if math.isnan(mean):
    return '-'
  return f'{mean:.{digits}f}' + ('' if math.isnan(sd) else f' ± {sd:.{digits}f}')


def markdown(summary: list[dict]) -> str:
  dense = next((r for r in summary if r['method'] == 'dense'), None)
  lines = ['| method | held-out bits/byte | Δ vs dense | tokens/s | active / total params | '
           'load CV | dead experts | α* |', '|---|---|---|---|---|---|---|---|']
  for r in summary:
    delta = f"{r['bits_per_byte'] - dense['bits_per_byte']:+.3f}" if dense else '-'
    lines.append(
        f"| {r['method']} | {_pm(r['bits_per_byte'], r['bits_per_byte_sd'], 3)} | {delta} | "
        f"{_pm(r['tokens_per_sec'], r['tokens_per_sec_sd'], 0)} | "
        f"{r['active_params'] / 1e6:.3f}M / {r['total_params'] / 1e6:.3f}M | "
        f"{_pm(r['load_cv'], r['load_cv_sd'], 3)} | {_pm(r['dead_experts'], math.nan, 1)} | "
        f"{_pm(r['alpha_star'], r['alpha_star_sd'], 2)} |")
  return '\n'.join(lines)


def plot(summary: list[dict], path: str) -> str:
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  fig, (ax_bpb, ax_speed) = plt.subplots(1, 2, figsize=(11, 3.8))
  names = [r['method'] for r in summary]
  for ax, key, label in ((ax_bpb, 'bits_per_byte', 'held-out bits per byte (lower is better)'),
                         (ax_speed, 'tokens_per_sec', 'training tokens/s')):
    sd = [0 if math.isnan(r[key + '_sd']) else r[key + '_sd'] for r in summary]
    ax.barh(names, [r[key] for r in summary], xerr=sd, color='tab:blue', alpha=0.8)
    ax.set_xlabel(label)
    ax.grid(axis='x', alpha=0.3)
    ax.invert_yaxis()
  values = [r['bits_per_byte'] for r in summary]
  spread = max(values) - min(values)
  ax_bpb.set_xlim(min(values) - spread - 0.02, max(values) + spread + 0.02)
  ax_speed.set_yticklabels([])
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)
  return path


def main(argv):
  del argv
  methods = _METHODS.value or list(METHODS)
  unknown = sorted(set(methods) - set(METHODS))
  if unknown:
    raise app.UsageError(f'--methods: unknown {unknown}; known: {list(METHODS)}')
  runs = [run_one(m, s) for m in methods for s in range(_SEEDS.value)]
  summary = summarise(runs)
  common.print_table(summary)
  command = (f'python -m benchmarks.study --steps={_STEPS.value} --seeds={_SEEDS.value} '
             f'--batch_size={_BATCH.value}')
  common.write_result('study', {'command': command, 'runs': runs, 'summary': summary})
  if _DOCS.value:
    docs = os.path.dirname(common.DOCS_RESULTS)
    plot(summary, os.path.join(docs, 'study.png'))
    common.write_docs_section('Study: every method at equal active parameters',
                              body(summary, command))


def body(summary: list[dict], command: str) -> str:
  tokens = _STEPS.value * _BATCH.value * 256
  return f"""Written by `{command}` ({common.device_description()}).

Every method is its experiment config (`configs/*.py`) at one size: 4 layers of width 128, 4
heads, feed-forward active width 384 (dense MLP; 8 SwiGLU experts of 192 with top-2 or, for expert
choice, capacity factor 2; UoE: 2 of 4 heads per token and 4 experts of 232 with 2 per token), the
same {tokens:,} training tokens ({_STEPS.value} steps of {_BATCH.value} × 256 bytes of the
default corpus, in the same order), learning rate 3e-3 with warm-up and cosine decay, seeds 0–{_SEEDS.value - 1}.
Each run is evaluated from its final checkpoint on the held-out split (20 batches of 16 × 256).
Columns: mean ± standard deviation over the seeds; tokens/s is the median training throughput of
the logged windows after compilation; active parameters are the matmul weights a token uses on
average (`model.transformer.active_params`); load CV is the coefficient of variation of the
per-expert load in the last logged window, averaged over routed layers; dead experts are summed
over layers (last window); α* is the ERC coupling level from the checkpoint's weights, averaged
over MoE layers (≤ 1: every router row and its expert are coupled).

![study](study.png)

{markdown(summary)}

What this scale can and cannot show: these are {tokens / 1e6:.1f}M-token runs of sub-million-
parameter models on a CPU. The differences between methods at this size are about optimisation in
the first minutes, not about what each method does at scale; read a difference as real only where
it exceeds the seed spread, and compare throughput only within this table (one machine, one
session; XLA:CPU runs the routed kernels through padded fallbacks that a GPU would not use). The
routing-health columns (balance, dead experts, α*) are the ones this scale checks well."""


if __name__ == '__main__':
  app.run(main)
