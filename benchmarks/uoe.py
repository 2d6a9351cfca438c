"""Claim: at 50% selection, SMHA costs <= 0.75x dense attention and UoME <= 0.7x the dense MLP
(forward + backward time, CPU, L >= 2k).

One layer, batch `--batch`, width `--dim`, `--heads` heads of dimension dim/heads (no GQA), SwiGLU
width `--mlp_dim`, for each L:
- dense attention (the model's `Attention` math: projections, RoPE, causal
  `jax.nn.dot_product_attention`, output projection) vs SMHA with heads_per_token = H/2 and
  capacity 1.0 (each head takes L/2 tokens per sequence), gate included;
- the dense SwiGLU MLP vs UoME data selection with E=4 experts, top-2, capacity 1.0 (each expert
  takes L/2 tokens), gate included;
- and, as the baseline that isolates what selection saves, each UoE layer at 100% selection (every
  head / expert takes every token: the same code with its gather, scatter and gate, none skipped).
Forward + backward is the gradient of sum(y * cotangent) w.r.t. the input and every weight (gate
included). Dense and UoE calls alternate within a round; each round gives a ratio; the table
reports the median of the per-round ratios (`time_ratio`), the ratio of the median times
(`ratio_of_medians`), the 50%-selection time relative to 100% selection (`vs_full`) and 100%
selection relative to dense (`full_vs_dense`). FLOPs: analytic matmul FLOPs of fwd + bwd (3x forward;
attention scores at full L x C, as XLA computes them, causal half not discounted), and XLA's own
`cost_analysis()` count of the compiled fwd + bwd program.

Usage: python -m benchmarks.uoe [--lengths=512,2048,8192] [--rounds=5] [--dim=256] [--heads=4]
"""

import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from benchmarks import common
from model import capacity, layers, smha, uoe
from model.attention import causal_attention

_LENGTHS = flags.DEFINE_list('lengths', ['512', '2048', '8192'], 'Sequence lengths.')
_BATCH = flags.DEFINE_integer('batch', 1, 'Sequences per call.')
_DIM = flags.DEFINE_integer('dim', 256, 'Model width D.')
_HEADS = flags.DEFINE_integer('heads', 4, 'Attention heads (head dim = dim / heads).')
_MLP = flags.DEFINE_integer('mlp_dim', 768, 'Dense SwiGLU width F (UoME: 4 experts of F/4).')
_EXPERTS = flags.DEFINE_integer('experts', 4, 'UoME experts (each token picks half of them).')
_ROUNDS = flags.DEFINE_integer('rounds', 5, 'Interleaved rounds per length (ratio = median).')

_TARGETS = {'smha': 0.75, 'uome': 0.7}  # at L >= 2048


def _fwd_bwd(fn, n_args):
  def loss(*args):
    *inputs, cot = args
    return jnp.sum(fn(*inputs).astype(jnp.float32) * cot)

  return jax.jit(jax.grad(loss, argnums=tuple(range(n_args))))


def _programs(l: int):
  """{name: (fwd+bwd fn, args, analytic fwd+bwd FLOPs)} for one length."""
  b, d, h, f, e = _BATCH.value, _DIM.value, _HEADS.value, _MLP.value, _EXPERTS.value
  kd = d // h
  rng = np.random.default_rng(0)
  arr = lambda *shape, s=0.05: jnp.asarray(s * rng.standard_normal(shape), jnp.float32)
  x, cot = arr(b, l, d, s=1.0), arr(b, l, d, s=1.0)
  positions = jnp.broadcast_to(jnp.arange(l, dtype=jnp.int32), (b, l))
  wq, wk, wv, wo = arr(d, h, kd), arr(d, h, kd), arr(d, h, kd), arr(h, kd, d)
  router_h, router_e = arr(d, h), arr(d, e)
  wg, wu, wd = arr(d, f), arr(d, f), arr(f, d)
  experts = uoe.mlp_to_experts(wg, wu, wd, e)

  def dense_attention(x, wq, wk, wv, wo):
    q = layers.apply_rope(jnp.einsum('bld,dhk->blhk', x, wq), positions, 1e4)
    k = layers.apply_rope(jnp.einsum('bld,dhk->blhk', x, wk), positions, 1e4)
    v = jnp.einsum('bld,dhk->blhk', x, wv)
    return jnp.einsum('blhk,hkd->bld', causal_attention(q, k, v), wo)

  def selective_attention(x, router, wq, wk, wv, wo):
    return smha.smha(x, router, wq, wk, wv, wo, positions, heads_per_token=h // 2)[0]

  def union_mlp(x, router, wg, wu, wd):
    return uoe.uome(x, router, wg, wu, wd, k=e // 2)[0]

  def selective_attention_full(x, router, wq, wk, wv, wo):
    return smha.smha(x, router, wq, wk, wv, wo, positions, heads_per_token=h)[0]

  def union_mlp_full(x, router, wg, wu, wd):
    return uoe.uome(x, router, wg, wu, wd, k=e)[0]

  c_h, c_e = capacity.capacity(l, h // 2, h, 1.0), capacity.capacity(l, e // 2, e, 1.0)
  t = b * l
  flops = {  # forward matmul FLOPs, x3 for forward + backward
    'dense_attention': 3 * (2 * t * d * 4 * d + 4 * b * l * l * d),
    'smha': 3 * (2 * t * d * h + 2 * b * h * c_h * d * kd * 4 + 4 * b * h * c_h * c_h * kd),
    'dense_mlp': 3 * 6 * t * d * f,
    'uome': 3 * (2 * t * d * e + 6 * b * e * c_e * d * (f // e)),
  }
  return {
    'dense_attention': (_fwd_bwd(dense_attention, 5), (x, wq, wk, wv, wo, cot)),
    'smha': (_fwd_bwd(selective_attention, 6), (x, router_h, wq, wk, wv, wo, cot)),
    'dense_mlp': (_fwd_bwd(layers.swiglu, 4), (x, wg, wu, wd, cot)),
    'uome': (_fwd_bwd(union_mlp, 5), (x, router_e, *experts, cot)),
    'smha_full': (_fwd_bwd(selective_attention_full, 6), (x, router_h, wq, wk, wv, wo, cot)),
    'uome_full': (_fwd_bwd(union_mlp_full, 5), (x, router_e, *experts, cot)),
  }, flops


def _xla_flops(fn, args) -> float | None:
  analysis = fn.lower(*args).compile().cost_analysis()
  analysis = analysis[0] if isinstance(analysis, (list, tuple)) else analysis
  return float(analysis['flops']) if analysis and 'flops' in analysis else None


def _once(fn, args) -> float:
  t0 = time.perf_counter()
  jax.block_until_ready(fn(*args))
  return time.perf_counter() - t0


def main(_):
  rows = []
  for l in map(int, _LENGTHS.value):
    progs, flops = _programs(l)
    xla = {
      name: _xla_flops(fn, args) for name, (fn, args) in progs.items() if not name.endswith('_full')
    }
    for fn, args in progs.values():  # warm-up (compile + one run)
      jax.block_until_ready(fn(*args))
    times = {name: [] for name in progs}
    for _ in range(_ROUNDS.value):  # interleaved: dense, routed, dense, routed within a round
      for name, (fn, args) in progs.items():
        times[name].append(_once(fn, args))
    for routed, dense in (('smha', 'dense_attention'), ('uome', 'dense_mlp')):
      ratios = [r / d for r, d in zip(times[routed], times[dense])]
      median = {name: statistics.median(times[name]) for name in (routed, dense, routed + '_full')}
      rows.append(
        {
          'layer': routed,
          'L': l,
          'dense_s': median[dense],
          'routed_s': median[routed],
          'full_s': median[routed + '_full'],
          'time_ratio': statistics.median(ratios),
          'ratio_of_medians': median[routed] / median[dense],
          'vs_full': median[routed] / median[routed + '_full'],
          'full_vs_dense': median[routed + '_full'] / median[dense],
          'flops_ratio': flops[routed] / flops[dense],
          'xla_flops_ratio': (xla[routed] / xla[dense] if xla[routed] and xla[dense] else None),
          'dense_gflop': flops[dense] / 1e9,
          'routed_gflop': flops[routed] / 1e9,
          'target': _TARGETS[routed] if l >= 2048 else None,
        }
      )
      print(rows[-1], flush=True)
  common.print_table(rows)
  met = {
    name: all(r['time_ratio'] <= t for r in rows if r['layer'] == name and r['L'] >= 2048)
    for name, t in _TARGETS.items()
  }
  result = {
    'batch': _BATCH.value,
    'dim': _DIM.value,
    'heads': _HEADS.value,
    'mlp_dim': _MLP.value,
    'experts': _EXPERTS.value,
    'rounds': _ROUNDS.value,
    'selection': 0.5,
    'rows': rows,
    'targets_at_L_ge_2048': _TARGETS,
    'met': met,
  }
  print('targets met:', met)
  print('wrote', common.write_result('uoe', result))


if __name__ == '__main__':
  app.run(main)
