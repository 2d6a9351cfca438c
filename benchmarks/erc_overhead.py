"""Claim: the ERC loss costs <= 2% of a training step at the larger batch, a constant absolute cost.

The ERC loss is n²·D·F per MoE layer and step, independent of the tokens, while the expert
computation grows with the batch (k·T·D·F): the relative overhead is about n² / (3·k·T) of the
MoE compute and falls as 1/T. Measured on the full jitted train step (`train.step`) of a small
all-MoE model, with and without `moe.erc_weight=1` (ERC on also logs alpha* every step), steps of
the two models alternating in one process; the overhead is the difference of the median step
times. On a shared CPU one step varies by 5-10%, more than the overhead, so two steadier numbers
come with it: the analytic FLOPs of the step and of its ERC work (`--flops_only` computes just
these; XLA's cost analysis counts a scanned loop body once, so it cannot be used here), and the
time of the isolated ERC work of one step (noise, loss, its gradient, alpha*, mean epsilon, per
MoE layer).

Width and expert width are small so that batches of the size the ratio needs fit a CPU
(n²/(3·k·T) does not depend on them): E=256 wants ~10⁵ tokens per step for 2% of the MoE compute,
so the batches of E experts are those of 64 experts times (E/64)²/2 (16 and 64 sequences of 256
tokens become 128 and 512 at E=256). Pretraining batches are 10⁶ tokens and more.

Usage: python -m benchmarks.erc_overhead [--experts=64,256] [--batch=16,64] [--reps=8]
"""

import statistics
import time

import jax
import numpy as np
from absl import app, flags

from benchmarks import common
from configs import moe_erc, schema, sharding
from model import erc, plan
from train import mesh as mesh_lib
from train.step import make_step_fns

_EXPERTS = flags.DEFINE_list('experts', ['64', '256'], 'Experts per MoE layer.')
_BATCH = flags.DEFINE_list(
  'batch',
  ['16', '64'],
  'Global batch sizes (sequences) for 64 experts; E experts get them times max(1, (E/64)²/2).',
)
_TOPK = flags.DEFINE_integer('top_k', 8, 'Experts per token.')
_SEQ = flags.DEFINE_integer('seq_len', 256, 'Tokens per sequence.')
_DIM = flags.DEFINE_integer('d_model', 128, 'Model width D.')
_EXPERT_DIM = flags.DEFINE_integer('expert_dim', 64, 'Expert hidden width F.')
_LAYERS = flags.DEFINE_integer('layers', 2, 'Layers (every one is an MoE layer).')
_REPS = flags.DEFINE_integer('reps', 8, 'Timed steps of each model (alternating).')
_FLOPS_ONLY = flags.DEFINE_bool(
  'flops_only',
  False,
  'Only the analytic FLOP overhead, no timing (writes erc_overhead_flops.json).',
)


def _config(experts: int, batch: int, erc_weight: float) -> schema.Config:
  c = moe_erc.get_config()
  c.model.update(
    num_layers=_LAYERS.value,
    d_model=_DIM.value,
    num_heads=4,
    num_kv_heads=4,
    mlp_dim=4 * _DIM.value,
    dtype='float32',
  )
  c.moe.update(
    num_experts=experts, top_k=_TOPK.value, expert_dim=_EXPERT_DIM.value, erc_weight=erc_weight
  )
  c.train.update(batch_size=batch, seq_len=_SEQ.value, steps=1000, peak_tflops=0.0)
  c.mesh.update(shape=(1, 1, 1, 1), rules='dp')
  return schema.load(c, 1)


def _stepper(cfg: schema.Config):
  """A function running one blocking train step on a fixed random batch."""
  mesh = mesh_lib.make_mesh(cfg.mesh, jax.devices()[:1])
  fns = make_step_fns(cfg, mesh, sharding.rules(cfg.mesh.rules))
  tokens = np.random.default_rng(0).integers(
    0, 257, (cfg.train.batch_size, cfg.train.seq_len + 1), dtype=np.int32
  )
  batch = jax.device_put({'inputs': tokens[:, :-1], 'targets': tokens[:, 1:]}, fns.batch_sharding)
  holder = {'state': fns.init()}

  def step():
    holder['state'], metrics = fns.train_step(holder['state'], batch)
    jax.block_until_ready(metrics)

  return step


def _isolated_erc_seconds(experts: int, reps: int) -> float:
  """Median time of one MoE layer's ERC work in a train step, times the number of layers."""
  d, f = _DIM.value, _EXPERT_DIM.value
  k1, k2, k3 = jax.random.split(jax.random.PRNGKey(0), 3)
  router_DE = jax.random.normal(k1, (d, experts)) * 0.02
  w_gate_EDF = jax.random.normal(k2, (experts, d, f)) * 0.02

  @jax.jit
  def work(r, w, key):
    delta = erc.erc_noise(key, r)
    loss, grad = jax.value_and_grad(lambda w: erc.erc_loss(r, w, delta_ED=delta))(w)
    return loss, grad, erc.coupling_level(r, w), erc.mean_epsilon(r)

  times = common.time_calls(lambda: jax.block_until_ready(work(router_DE, w_gate_EDF, k3)), reps)
  return statistics.median(times) * _LAYERS.value


def analytic_flops(cfg: schema.Config) -> tuple[float, float]:
  """Training FLOPs of one step (PaLM accounting, `model.plan`) and of its
  ERC work: per MoE layer the E×E×F activations for the loss (forward and the W_g gradient) and
  again for alpha*, each 2·E²·D·F."""
  m, model = cfg.moe, cfg.model
  tokens = cfg.train.batch_size * cfg.train.seq_len
  layer_plan = plan.build(model, cfg.train.seq_len)
  layers = sum(layer.spec.feed_forward == 'moe' for layer in layer_plan.layers)
  step = layer_plan.flops_per_token * tokens
  return step, 3 * 2.0 * m.num_experts**2 * model.d_model * m.hidden(model.mlp_dim) * layers


def measure(experts: int, batch: int) -> dict:
  step_flops, erc_flops = analytic_flops(_config(experts, batch, 1.0))
  row = {
    'experts': experts,
    'top_k': _TOPK.value,
    'batch': batch,
    'tokens': batch * _SEQ.value,
    'gflop_step': step_flops / 1e9,
    'gflop_erc': erc_flops / 1e9,
    'flop_overhead_pct': 100 * erc_flops / step_flops,
  }
  if _FLOPS_ONLY.value:
    return row
  steps = {name: _stepper(_config(experts, batch, w)) for name, w in (('base', 0.0), ('erc', 1.0))}
  for step in steps.values():  # compile and warm up
    step()
    step()
  times = {name: [] for name in steps}
  for _ in range(_REPS.value):
    for name, step in steps.items():
      t0 = time.perf_counter()
      step()
      times[name].append(time.perf_counter() - t0)
  base, with_erc = (statistics.median(times[n]) for n in ('base', 'erc'))
  isolated = _isolated_erc_seconds(experts, max(_REPS.value, 5))
  tokens = batch * _SEQ.value
  return {
    **row,
    'step_ms': base * 1e3,
    'step_erc_ms': with_erc * 1e3,
    'overhead_ms': (with_erc - base) * 1e3,
    'overhead_pct': 100 * (with_erc - base) / base,
    'isolated_erc_ms': isolated * 1e3,
    'isolated_pct': 100 * isolated / base,
    'predicted_pct_of_moe': 100 * experts**2 / (3 * _TOPK.value * tokens),
    'step_s_each': times,
  }


def main(argv):
  del argv
  rows = []
  for experts in map(int, _EXPERTS.value):
    scale = max(1, (experts // 64) ** 2 // 2)  # the overhead goes as E²/T
    for batch in map(int, _BATCH.value):
      rows.append(measure(experts, batch * scale))
      common.print_table([{k: v for k, v in rows[-1].items() if k != 'step_s_each'}])
  print()
  common.print_table([{k: v for k, v in r.items() if k != 'step_s_each'} for r in rows])
  config = {
    'seq_len': _SEQ.value,
    'd_model': _DIM.value,
    'expert_dim': _EXPERT_DIM.value,
    'layers': _LAYERS.value,
    'reps': _REPS.value,
    'dtype': 'float32',
  }
  name = 'erc_overhead_flops' if _FLOPS_ONLY.value else 'erc_overhead'
  print(common.write_result(name, {'config': config, 'rows': rows}))


if __name__ == '__main__':
  app.run(main)
