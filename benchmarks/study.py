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

import json
import math
import os
import statistics
import time

import jax
from absl import app, flags

from benchmarks import common
from configs import (
  demo,
  moe_entropy,
  moe_erc,
  moe_expert_choice,
  moe_lossfree,
  moe_topk,
  routing_transformer,
  schema,
  uoe,
)
from eval import evaluate, routing_report
from model import plan
from train import sweep
from train.train import train_and_evaluate

_STEPS = flags.DEFINE_integer('steps', 200, 'Training steps of every run.')
_SEEDS = flags.DEFINE_integer('seeds', 3, 'Seeds per method (train.seed = 0 .. N-1).')
_BATCH = flags.DEFINE_integer('batch_size', 8, 'Global batch in sequences of 256 tokens.')
_METHODS = flags.DEFINE_list('methods', None, 'Subset of the methods; default: all.')
_ROOT = flags.DEFINE_string('root', 'runs/study', 'Directory of the runs.')
_DOCS = flags.DEFINE_bool('docs', True, 'Write the Study section of docs/results.md.')
_TIMING = flags.DEFINE_integer(
  'timing_steps',
  10,
  'Steps per method and round of the throughput '
  'pass (bare jitted step, methods interleaved); 0 = skip it.',
)
_ROUNDS = flags.DEFINE_integer('timing_rounds', 3, 'Rounds of the throughput pass.')


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
  c.model.update(
    num_layers=4, d_model=128, num_heads=4, num_kv_heads=4, dtype='float32', remat='none'
  )
  if method != 'uoe':
    c.model.mlp_dim = 384
  c.train.update(
    steps=_STEPS.value,
    batch_size=_BATCH.value,
    seq_len=256,
    seed=seed,
    log_every=max(_STEPS.value // 10, 1),
    peak_tflops=0.0,
  )
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
  result_path = os.path.join(workdir, 'eval', f'step_{cfg.train.steps}.json')
  result = None
  if os.path.exists(result_path):  # evaluated by an earlier (interrupted) study run
    with open(result_path) as f:
      result = json.load(f)
  if result is None or 'evaluation' not in result:  # none yet, or from before exact-prefix scoring
    result = evaluate.evaluate_checkpoint(workdir)
  if not result['causal']:  # score: exact-prefix, paired (teacher-forced + the measured leak)
    result = {**result, **evaluate.paired_estimate(result)}
  records = routing_report.read_metrics(workdir)
  speeds = [r['tokens_per_sec'] for r in records[1:]]  # the first window includes compilation
  last = records[-1]
  return {
    'method': method,
    'seed': seed,
    'bits_per_byte': result.get('paired_bits_per_byte', result['bits_per_byte']),
    'heldout_loss': result.get('paired_loss', result['loss']),
    'train_loss': last['loss'],
    'evaluation': 'teacher-forced' if result['causal'] else 'exact-prefix',
    'teacher_forced_bits_per_byte': result.get(
      'teacher_forced_bits_per_byte', result['bits_per_byte']
    ),
    'sampled_bits_per_byte': result['bits_per_byte'],
    'future_leak': result.get('future_leak', 0.0),
    'tokens_per_sec': statistics.median(speeds) if speeds else math.nan,
    'active_params': plan.build(cfg.model, cfg.train.seq_len).active_params,
    'total_params': plan.build(cfg.model).params,
    'load_cv': _layer_mean(last, ('/moe/load_cv', '/uoe/mlp_load_cv')),
    'dead_experts': (
      sum(v for k, v in last.items() if k.endswith('/dead_experts'))
      if any(k.endswith('/dead_experts') for k in last)
      else math.nan
    ),
    'alpha_star': statistics.fmean(v for k, v in result.items() if k.endswith('/coupling_level'))
    if any(k.endswith('/coupling_level') for k in result)
    else math.nan,
  }


def time_methods(methods: list[str], steps: int, rounds: int) -> dict[str, list[float]]:
  """Training tokens/s of each method's bare jitted step (seed 0, one fixed batch), `rounds`
  rounds of `steps` steps with the methods interleaved, so that a change in the machine's load
  reaches every method alike; the training runs' own throughput is only as quiet as the machine
  was during each run."""
  steppers = {}
  for method in methods:
    cfg = config(method, 0)
    steppers[method] = (common.bare_train_step(cfg), cfg.train.batch_size * cfg.train.seq_len)
    for _ in range(3):  # compile and warm up
      metrics = steppers[method][0]()
    jax.block_until_ready(metrics)
  speeds: dict[str, list[float]] = {m: [] for m in methods}
  for _ in range(rounds):
    for method, (step, tokens) in steppers.items():
      t0 = time.perf_counter()
      for _ in range(steps):
        metrics = step()
      jax.block_until_ready(metrics)
      speeds[method].append(steps * tokens / (time.perf_counter() - t0))
  return speeds


def summarise(runs: list[dict]) -> list[dict]:
  """Per method: mean and standard deviation over seeds of each measured column."""
  out = []
  for method in dict.fromkeys(r['method'] for r in runs):
    rows = [r for r in runs if r['method'] == method]
    row = {'method': method, 'seeds': len(rows)}
    row['evaluation'] = rows[0]['evaluation']
    for key in (
      'bits_per_byte',
      'teacher_forced_bits_per_byte',
      'sampled_bits_per_byte',
      'future_leak',
      'heldout_loss',
      'tokens_per_sec',
      'load_cv',
      'dead_experts',
      'alpha_star',
    ):
      values = [r[key] for r in rows]
      undefined = any(math.isnan(v) for v in values)  # e.g. load CV of a model without experts
      row[key] = math.nan if undefined else statistics.fmean(values)
      row[key + '_sd'] = math.nan if undefined or len(values) < 2 else statistics.stdev(values)
    row['active_params'], row['total_params'] = rows[0]['active_params'], rows[0]['total_params']
    out.append(row)
  return out


def _pm(mean: float, sd: float, digits: int) -> str:
  if math.isnan(mean):
    return '-'
  return f'{mean:.{digits}f}' + ('' if math.isnan(sd) else f' ± {sd:.{digits}f}')


def _speed(r: dict) -> tuple[float, float, float]:
  """(tokens/s, low, high): the throughput pass's median and range, else the training runs'
  median throughput ± its seed standard deviation."""
  if 'step_tokens_per_sec' in r:
    return r['step_tokens_per_sec'], r['step_tokens_per_sec_min'], r['step_tokens_per_sec_max']
  sd = 0.0 if math.isnan(r['tokens_per_sec_sd']) else r['tokens_per_sec_sd']
  return r['tokens_per_sec'], r['tokens_per_sec'] - sd, r['tokens_per_sec'] + sd


def markdown(summary: list[dict]) -> str:
  dense = next((r for r in summary if r['method'] == 'dense'), None)
  lines = [
    '| method | evaluation | held-out bits/byte | Δ vs dense | teacher-forced bits/byte '
    '| future leak (nats) | tokens/s | × dense | active / total params | load CV '
    '| dead experts | α* |',
    '|---|---|---|---|---|---|---|---|---|---|---|---|',
  ]
  for r in summary:
    delta = f'{r["bits_per_byte"] - dense["bits_per_byte"]:+.3f}' if dense else '-'
    speed, low, high = _speed(r)
    causal = r['evaluation'] == 'teacher-forced'
    leak = '-' if causal else _pm(r['future_leak'], r['future_leak_sd'], 4)
    ratio = f'{speed / _speed(dense)[0]:.2f}' if dense else '-'
    lines.append(
      f'| {r["method"]} | {r["evaluation"]} | '
      f'{_pm(r["bits_per_byte"], r["bits_per_byte_sd"], 3)} | {delta} | '
      f'{_pm(r["teacher_forced_bits_per_byte"], r["teacher_forced_bits_per_byte_sd"], 3)} | '
      f'{leak} | '
      f'{speed:,.0f} ({low:,.0f}–{high:,.0f}) | {ratio} | '
      f'{r["active_params"] / 1e6:.3f}M / {r["total_params"] / 1e6:.3f}M | '
      f'{_pm(r["load_cv"], r["load_cv_sd"], 3)} | {_pm(r["dead_experts"], math.nan, 1)} | '
      f'{_pm(r["alpha_star"], r["alpha_star_sd"], 2)} |'
    )
  return '\n'.join(lines)


def plot(summary: list[dict], path: str) -> str:
  import matplotlib  # pylint: disable=g-import-not-at-top

  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  fig, (ax_bpb, ax_speed) = plt.subplots(1, 2, figsize=(11, 3.8))
  names = [r['method'] for r in summary]
  sd = [0 if math.isnan(r['bits_per_byte_sd']) else r['bits_per_byte_sd'] for r in summary]
  values = [r['bits_per_byte'] for r in summary]
  ax_bpb.barh(names, values, xerr=sd, color='tab:blue', alpha=0.8)
  ax_bpb.set_xlabel('held-out bits per byte (mean ± sd over seeds; lower is better)')
  spread = max(values) - min(values)
  ax_bpb.set_xlim(min(values) - spread - 0.02, max(values) + spread + 0.02)
  speeds = [_speed(r) for r in summary]
  ax_speed.barh(
    names,
    [s for s, _, _ in speeds],
    color='tab:green',
    alpha=0.8,
    xerr=[[s - lo for s, lo, _ in speeds], [hi - s for s, _, hi in speeds]],
  )
  ax_speed.set_xlabel('training tokens/s (train step; range over rounds)')
  ax_speed.set_yticklabels([])
  for ax in (ax_bpb, ax_speed):
    ax.grid(axis='x', alpha=0.3)
    ax.invert_yaxis()
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
  if _TIMING.value:
    speeds = time_methods(methods, _TIMING.value, _ROUNDS.value)
    for row in summary:
      row['step_tokens_per_sec'] = statistics.median(speeds[row['method']])
      row['step_tokens_per_sec_min'] = min(speeds[row['method']])
      row['step_tokens_per_sec_max'] = max(speeds[row['method']])
  common.print_table(summary)
  command = (
    f'python -m benchmarks.study --steps={_STEPS.value} --seeds={_SEEDS.value} '
    f'--batch_size={_BATCH.value} --timing_steps={_TIMING.value} '
    f'--timing_rounds={_ROUNDS.value}'
  )
  common.write_result('study', {'command': command, 'runs': runs, 'summary': summary})
  if _DOCS.value:
    docs = os.path.dirname(common.DOCS_RESULTS)
    plot(summary, os.path.join(docs, 'study.png'))
    common.write_docs_section(
      'Study: every method at equal active parameters', body(summary, command)
    )


def beyond_spread(summary: list[dict]) -> str:
  """A sentence naming the methods whose held-out bits/byte differ from dense's by more than the
  sum of the two seed standard deviations."""
  dense = next((r for r in summary if r['method'] == 'dense'), None)
  if dense is None or math.isnan(dense['bits_per_byte_sd']):
    return 'Without a dense row and several seeds, no difference is compared with the spread.'
  out = [
    f'{r["method"]} ({r["bits_per_byte"] - dense["bits_per_byte"]:+.3f})'
    for r in summary
    if r is not dense
    and abs(r['bits_per_byte'] - dense['bits_per_byte'])
    > r['bits_per_byte_sd'] + dense['bits_per_byte_sd']
  ]
  return (
    'Held-out bits/byte further from dense than the two seed standard deviations together: '
    + (', '.join(out) if out else 'none')
    + '; every other difference is within the seed '
    'spread.'
  )


def body(summary: list[dict], command: str) -> str:
  tokens = _STEPS.value * _BATCH.value * 256
  return f"""Written by `{command}` ({common.device_description()}).

Every method is its experiment config (`configs/*.py`) at one size: 4 layers of width 128, 4
heads, feed-forward active width 384 (dense MLP; 8 SwiGLU experts of 192 with top-2 or, for expert
choice, capacity factor 2; UoE: 2 of 4 heads per token and 4 experts of 232 with 2 per token), the
same {tokens:,} training tokens ({_STEPS.value} steps of {_BATCH.value} × 256 bytes of the
default corpus, in the same order), learning rate 3e-3 with warm-up and cosine decay, seeds 0–{_SEEDS.value - 1}.
Each run is evaluated from its final checkpoint on the held-out split (20 batches of 16 × 256),
honestly (docs/causality.md): a causal method teacher-forced over every position (exact for it);
a method whose logits at t can read tokens after t (routing attention, expert choice, UoE at
partial capacity) exact-prefix: 4 positions per window (1,280 per run) are each predicted from
their prefix alone, and the score is the paired estimate of the exact-prefix loss over every
position, teacher-forced loss + future leak, where the leak is the mean of exact-prefix minus
teacher-forced at the sampled positions (`eval.evaluate`'s `paired_bits_per_byte`; its error is
the leak's, a few thousandths of a nat, where the direct mean over 1,280 sampled positions has
about 0.05). The `evaluation` column says which; the teacher-forced number, which lets a position
see the future, is shown beside it and is not the score; future leak is in nats per token.
Columns: mean ± standard deviation over the seeds; tokens/s is the bare jitted train step's
throughput (seed 0, one fixed batch of {_BATCH.value} × 256) in a separate pass with the methods
interleaved ({_ROUNDS.value} rounds of {_TIMING.value} steps; median and range), so every method meets the same machine load,
and × dense is its ratio to the dense model's; active parameters are the matmul weights a token uses on
average (`model.plan`, `ModelPlan.active_params`); load CV is the coefficient of variation of the
per-expert load in the last logged window, averaged over routed layers; dead experts are summed
over layers (last window); α* is the ERC coupling level from the checkpoint's weights, averaged
over MoE layers (≤ 1: every router row and its expert are coupled); "-" where a method has no
such quantity (expert choice's load CV is 0 by construction: every expert takes its capacity;
UoE's is its expert gate's).

![study](study.png)

{markdown(summary)}

{beyond_spread(summary)}

What this scale can and cannot show: these are {tokens / 1e6:.1f}M-token runs of models with
about 0.9M active parameters on a CPU. The differences between methods at this size are about optimisation in
the first minutes, not about what each method does at scale; read a difference as real only where
it exceeds the seed spread, and compare throughput only within this table (one machine, one
session; XLA:CPU runs the routed kernels through padded fallbacks that a GPU would not use). The
routing-health columns (balance, dead experts, α*) are the ones this scale checks well."""


if __name__ == '__main__':
  app.run(main)
