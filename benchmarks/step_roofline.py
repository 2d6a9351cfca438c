"""Where the bare train step's time goes on the device in use (issue 22): its matmul roofline.

Times every distinct GEMM of one training step (forward x@W, backward dX = dY@Wᵀ and dW = Xᵀ@dY
of each projection, the MoE experts at their mean rows per expert, the tied head, and the
attention score/value batched matmuls) as a jitted matmul; the roofline step time is
Σ FLOPs / measured rate. Then the train step, and its parts each jitted on its own (forward,
forward+backward, optimizer, non-finite guard, metrics), and the top ops of a profiler trace.

Usage: python -m benchmarks.step_roofline [--shape=demo|large] [--moe] [--steps=10] [--smoke]
Hardware: any; on 2 CPU cores the demo shape takes about a minute. Writes
benchmarks/results/step_roofline_<shape>[_moe[_<gmm_impl>]].json (the kernel where
--config.moe.gmm_impl names one; --smoke: a toy size, writes nowhere).
"""

import collections
import dataclasses
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import app, flags
from flax import nnx
from ml_collections import config_flags

from benchmarks import common, xla_profile
from configs import schema, sharding
from model import axes, chunked_attention, flash, gmm, plan
from train import memory
from train import mesh as mesh_lib
from train import step as step_lib
from train.optimizer import learning_rate_schedule, make_optimizer

SHAPES = {  # the table; vocab 384 from the config
  'demo': dict(layers=4, d=128, heads=4, head_dim=32, mlp=384, seq=256, batch=16),
  'large': dict(layers=8, d=256, heads=4, head_dim=64, mlp=768, seq=512, batch=4),
  'smoke': dict(layers=2, d=64, heads=2, head_dim=32, mlp=128, seq=64, batch=4),
}


class Unmeasurable(Exception):
  """The benchmark cannot run here (bad shape, too little memory, failing profiler): one line."""


def build_config(config, shape: str, moe: bool) -> schema.Config:
  """`config` (a ConfigDict) at `shape`: dense attention, f32, one device, rules 'dp'."""
  if shape not in SHAPES:
    raise Unmeasurable(f'unknown shape {shape!r}; known: {", ".join(s for s in SHAPES)}')
  s = SHAPES[shape]
  c = config.copy_and_resolve_references()
  c.model.update(
    num_layers=s['layers'], d_model=s['d'], num_heads=s['heads'], num_kv_heads=s['heads'],
    mlp_dim=s['mlp'], dtype='float32', param_dtype='float32', remat='none',
  )  # fmt: skip
  c.attention.kind = 'dense'
  c.train.update(batch_size=s['batch'], seq_len=s['seq'], grad_accum=1)
  c.mesh.update(shape=(1, 1, 1, 1), rules='dp')
  if moe:
    c.moe.update(num_experts=8, top_k=2, expert_dim=s['mlp'] // 2, execution='dropless')
    c.moe.update(router='topk', shared_experts=0, every=1)
  else:
    c.moe.update(num_experts=0, erc_weight=0.0)
  cfg = schema.load(c, 1)
  if cfg.model.d_model // cfg.model.num_heads != s['head_dim']:
    raise Unmeasurable(f'shape {shape}: head dim {cfg.model.d_model // cfg.model.num_heads}')
  try:
    memory.check(cfg, 1)
  except schema.ConfigError as e:
    raise Unmeasurable(f'shape {shape} does not fit: {e}') from None
  return cfg


def gemms(cfg: schema.Config) -> dict:
  """{(batch, M, K, N): count per step} of every matmul of one step, and its provenance: the
  attention's as its kernel runs them (`attention.impl`, resolved on this platform)."""
  m, t = cfg.model, cfg.train
  tokens, hd = t.batch_size * t.seq_len, m.d_model // m.num_heads
  weights = []  # (name, rows, K, N, count per step)
  for _ in range(m.num_layers):
    weights += [('q', tokens, m.d_model, m.num_heads * hd, 1)]
    weights += [('k|v', tokens, m.d_model, m.num_kv_heads * hd, 1)] * 2  # k and v
    weights += [('o', tokens, m.num_heads * hd, m.d_model, 1)]
    if cfg.moe.num_experts:
      e, rows = cfg.moe.num_experts, tokens * cfg.moe.top_k // cfg.moe.num_experts
      width = cfg.moe.expert_dim or m.mlp_dim
      weights += [('router', tokens, m.d_model, e, 1)]
      weights += [
        ('expert_in', rows, m.d_model, width, 2 * e),
        ('expert_out', rows, width, m.d_model, e),
      ]
    else:
      weights += [
        ('mlp_in', tokens, m.d_model, m.mlp_dim, 2),
        ('mlp_out', tokens, m.mlp_dim, m.d_model, 1),
      ]
  weights += [('head', tokens, m.d_model, m.vocab_size, 1)]
  shapes, names = collections.Counter(), collections.defaultdict(set)
  for name, rows, k, n, count in weights:  # forward, dX, dW
    for key, role in (((1, rows, k, n), 'fwd'), ((1, rows, n, k), 'dX'), ((1, k, rows, n), 'dW')):
      shapes[key] += count
      names[key].add(f'{name}.{role}')
  bh, seq = t.batch_size * m.num_heads, t.seq_len
  # s = q@kᵀ, o = p@v and their backward dp, dv, dq, dk, per query chunk against its key prefix
  # (the 'xla' kernel: one chunk of all rows against all keys)
  kernel = flash.resolve_impl(cfg.attention.impl, m.dtype)
  chunk = chunked_attention.chunk_size(seq) if kernel == 'chunked' else seq
  for _ in range(m.num_layers):
    for start in range(0, seq, chunk):
      rows, keys = min(chunk, seq - start), min(start + chunk, seq)
      for key, role in (
        ((bh, rows, hd, keys), 'attn.qk|dp'),
        ((bh, rows, keys, hd), 'attn.pv|dq'),
        ((bh, keys, rows, hd), 'attn.dv|dk'),
      ):
        shapes[key] += 2
        names[key].add(role)
  return {'counts': dict(shapes), 'names': {k: sorted(v) for k, v in names.items()}}


def matmul_roofline(cfg, reps: int) -> dict:
  """Each distinct matmul shape timed as its own jitted matmul: rate and the roofline time."""
  g = gemms(cfg)
  rows, total_s, total_flops = [], 0.0, 0.0
  mm = jax.jit(jnp.matmul)
  for (b, m_, k, n), count in sorted(g['counts'].items()):
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((b, m_, k) if b > 1 else (m_, k), np.float32))
    w = jnp.asarray(rng.standard_normal((b, k, n) if b > 1 else (k, n), np.float32))
    sec = _async_s(lambda x=x, w=w: mm(x, w), reps)
    flops = 2.0 * b * m_ * k * n
    rows.append({
      'batch': b, 'M': m_, 'K': k, 'N': n, 'count': count, 'uses': g['names'].get((b, m_, k, n), []),
      'seconds': sec, 'gflops_per_s': flops / sec / 1e9, 'step_seconds': count * sec,
    })  # fmt: skip
    total_s, total_flops = total_s + count * sec, total_flops + count * flops
  return {'gemms': rows, 'roofline_step_s': total_s, 'gemm_flops_per_step': total_flops,
          'mean_gemm_gflops_per_s': total_flops / total_s / 1e9}  # fmt: skip


def _async_s(fn, reps: int, rounds: int = 3) -> float:
  """Seconds per call of `fn` dispatched `reps` times back to back (waiting on the last only, so
  dispatch overlaps execution), best of `rounds`: a matmul's rate without per-call waits."""
  jax.block_until_ready(fn())
  best = float('inf')
  for _ in range(rounds):
    t0 = time.perf_counter()
    for _ in range(reps):
      out = fn()
    jax.block_until_ready(out)
    best = min(best, (time.perf_counter() - t0) / reps)
  return best


def _median_s(fn, reps: int) -> float:
  return statistics.median(common.time_calls(lambda: jax.block_until_ready(fn()), reps))


def random_batch_step(cfg) -> tuple[callable, step_lib.StepFns, dict]:
  """(step, fns, batch): `cfg`'s jitted train step on one fixed random batch, the state carried
  from call to call; `step()` waits for the new state and metrics (a synchronised step)."""
  mesh, rules = mesh_lib.make_mesh(cfg.mesh), sharding.rules(cfg.mesh.rules)
  fns = step_lib.make_step_fns(cfg, mesh, rules)
  rng = np.random.default_rng(0)
  toks = rng.integers(0, cfg.model.vocab_size, (cfg.train.batch_size, cfg.train.seq_len + 1))
  toks = toks.astype(np.int32)
  batch = jax.device_put({'inputs': toks[:, :-1], 'targets': toks[:, 1:]}, fns.batch_sharding)
  carried = [fns.init()]

  def step():
    carried[0], metrics = fns.train_step(carried[0], batch)
    jax.block_until_ready((carried[0], metrics))

  return step, fns, batch


def step_breakdown(cfg, reps: int) -> tuple[dict, callable, str]:
  """Median seconds of the whole step and of each part jitted on its own; also the step fn and
  its compiled HLO text."""
  mesh, rules = mesh_lib.make_mesh(cfg.mesh), sharding.rules(cfg.mesh.rules)
  train_step, fns, batch = random_batch_step(cfg)
  state = fns.init()
  with axes.axis_rules(mesh, rules):
    graph, params, rest = nnx.split(fns.model(state), nnx.Param, ...)

  def loss_of(p, r, b):
    with axes.axis_rules(mesh, rules):
      return step_lib.model_loss(nnx.merge(graph, p, r, copy=True), b)

  fwd = jax.jit(lambda p, r, b: loss_of(p, r, b)[0])
  grad = jax.jit(jax.value_and_grad(loss_of, has_aux=True))
  (loss, (_, aux)), grads = grad(params, rest, batch)
  tx = make_optimizer(cfg.optimizer, cfg.train.steps)
  opt_state = jax.jit(tx.init)(params)

  @jax.jit
  def update(g, s, p):
    updates, s = tx.update(g, s, p)
    return optax.apply_updates(p, updates), s

  @jax.jit
  def guard(loss, grads, new, old):  # as the step: norm, all_finite over the new state, select
    finite = jnp.isfinite(loss) & jnp.isfinite(optax.tree.norm(grads)) & step_lib.all_finite(new)
    return jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)

  schedule = learning_rate_schedule(cfg.optimizer, cfg.train.steps)

  @jax.jit
  def metrics(aux, step):  # beyond the parts: the routing-state update, lr and the count vectors
    with axes.axis_rules(mesh, rules):
      model = nnx.merge(graph, params, rest, copy=True)
      model.update_state(jax.lax.stop_gradient(aux['stats']))
      return schedule(step), step_lib._count_metrics(model, aux['stats']), nnx.state(model)  # pylint: disable=protected-access

  new = fns.init()  # a second state: the guard selects between two
  parts = {
    'forward': lambda: fwd(params, rest, batch),
    'forward_backward': lambda: grad(params, rest, batch),
    'optimizer': lambda: update(grads, opt_state, params),
    'finite_guard': lambda: guard(loss, grads, new, state),
    'metrics': lambda: metrics(aux, state['opt']['step'][...]),
  }
  out = {name: _median_s(fn, reps) for name, fn in parts.items()}
  out['step'] = _median_s(train_step, reps)
  out['backward_only'] = out['forward_backward'] - out['forward']
  out['unaccounted'] = out['step'] - sum(out[k] for k in parts if k != 'forward')
  hlo_text = fns.train_step.lower(state, batch).compile().as_text()  # the profile's source lines
  return out, train_step, hlo_text


def variant_configs(cfg: schema.Config) -> dict[str, schema.Config]:
  """The step as configured, beside the attention reference kernel and the other layer loop."""
  m = cfg.model
  model = lambda **kw: dataclasses.replace(cfg, model=dataclasses.replace(m, **kw))
  xla = dataclasses.replace(m.attention, impl='xla')
  return {
    'as_configured': cfg,
    'attention_impl_xla': model(attention=xla),
    f'scan_layers_{not m.scan_layers}': model(scan_layers=not m.scan_layers),
    f'attention_impl_xla_scan_layers_{not m.scan_layers}': model(
      attention=xla, scan_layers=not m.scan_layers
    ),
  }


def interleaved_steps(cfgs: dict, calls_each: int) -> dict:
  """Median and min seconds of each config's bare train step, the configs called in turn
  (`common.time_alternating`), so that slow phases of a shared machine hit every variant alike."""
  calls = {name: random_batch_step(cfg)[0] for name, cfg in cfgs.items()}
  times = common.time_alternating(calls, calls_each, warmup=2)
  return {
    name: {'median_s': statistics.median(t), 'min_s': min(t), 'calls': len(t)}
    for name, t in times.items()
  }


def run(config, shape: str, moe: bool, steps: int) -> dict:
  """The whole measurement as one dict (see the module docstring)."""
  cfg = build_config(config, shape, moe)
  roof = matmul_roofline(cfg, reps=max(3, steps // 2))
  parts, step_fn, hlo_text = step_breakdown(cfg, steps)
  profile = xla_profile.top_ops(step_fn, n_steps=3, unmeasurable=Unmeasurable, hlo_text=hlo_text)
  variants = variant_configs(cfg)
  kernel = gmm.resolve(cfg.model.moe.gmm_impl, dtype=jnp.dtype(cfg.model.dtype)) if moe else None
  if moe:  # the dense step of equal active FLOPs, in the same run: the MoE/dense ratio
    variants['dense_equal_active_flops'] = build_config(config, shape, moe=False)
    for rows in (128, 512) if kernel == 'scan' else ():  # block rows against moe.block_rows
      moe_cfg = dataclasses.replace(cfg.model.moe, block_size=rows)
      variants[f'moe_blocks_{rows}'] = dataclasses.replace(
        cfg, model=dataclasses.replace(cfg.model, moe=moe_cfg)
      )
  variants = interleaved_steps(variants, calls_each=steps)
  flops_tok = plan.build(cfg.model, cfg.train.seq_len).flops_per_token
  tokens = cfg.train.batch_size * cfg.train.seq_len
  return {
    'shape': shape,
    'moe': moe,
    'model': dict(SHAPES[shape], vocab=cfg.model.vocab_size),
    'gmm_kernel': kernel,  # what moe.gmm_impl resolved to on this device
    'moe_config': {
      k: getattr(cfg.moe, k)
      for k in (
        'num_experts',
        'top_k',
        'expert_dim',
        'execution',
        'gmm_impl',
        'block_size',
        'erc_weight',
      )
    }
    if moe
    else None,  # fmt: skip
    'timed_calls': steps,
    'plan_flops_per_token': flops_tok,
    'plan_flops_per_step': flops_tok * tokens,
    'step_s': parts['step'],
    'gflops_per_s_plan': flops_tok * tokens / parts['step'] / 1e9,
    'gflops_per_s_gemms': roof['gemm_flops_per_step'] / parts['step'] / 1e9,
    'roofline_fraction': roof['roofline_step_s'] / parts['step'],
    'breakdown_s': parts,
    **roof,
    'profile': profile,
    'variants': variants,
    'variants_note': ('bare train step of the same shape with the attention reference kernel '
                      "('xla') and/or the other layer loop (scan or unrolled), and for --moe the "
                      'dense step of equal active FLOPs and, with the scan kernel, the MoE step with '
                      'blocks of 128 and 512 rows (auto: model.moe.block_rows), called in turn in this run (timed_calls '
                      'each): median and min seconds per step'),
    'moe_over_dense': (variants['as_configured']['median_s']
                       / variants['dense_equal_active_flops']['median_s']) if moe else None,
  }  # fmt: skip


def _define_flags() -> None:
  """The command-line flags, defined only when run as a program (importing this module, as the
  tests do, defines none, so several benchmarks can be imported into one process)."""
  global _CONFIG, _SHAPE, _MOE, _STEPS, _SMOKE
  _CONFIG = config_flags.DEFINE_config_file('config', 'configs/demo.py', 'Experiment config.')
  _SHAPE = flags.DEFINE_string('shape', 'demo', 'Model shape: ' + ' | '.join(('demo', 'large')))
  _MOE = flags.DEFINE_bool('moe', False, '8 experts top-2 of width mlp_dim / 2, dropless.')
  _STEPS = flags.DEFINE_integer('steps', 10, 'Timed calls per program (median reported).')
  _SMOKE = flags.DEFINE_bool('smoke', False, 'Toy size in seconds; writes nothing.')


def main(argv):
  del argv
  shape = 'smoke' if _SMOKE.value else _SHAPE.value
  try:
    result = run(_CONFIG.value, shape, _MOE.value, 3 if _SMOKE.value else _STEPS.value)
  except (Unmeasurable, schema.ConfigError) as e:
    print(f'step_roofline: {e}', file=sys.stderr)
    sys.exit(1)
  b = result['breakdown_s']
  print(' '.join(f'{k}={v * 1e3:.1f}ms' for k, v in b.items()))
  print(f'roofline {result["roofline_step_s"] * 1e3:.1f} ms = {result["roofline_fraction"]:.2f} of '
        f'the step; {result["gflops_per_s_plan"]:.1f} GFLOP/s by the plan')  # fmt: skip
  for name, v in result['variants'].items():
    print(f'  step {name}: median {v["median_s"] * 1e3:.1f} ms, min {v["min_s"] * 1e3:.1f} ms')
  if result['moe_over_dense']:
    print(f'MoE step / dense step of equal active FLOPs: {result["moe_over_dense"]:.2f}')
  for op in result['profile']['top_ops']:
    print(f'  {op["share_of_step"]:6.1%}  {op["op"]}  ({op.get("source", "?")})')
  print('by source line:')
  for src in result['profile'].get('top_sources', []):
    print(f'  {src["share_of_step"]:6.1%}  {src["source"]}')
  if not _SMOKE.value:
    result['command'] = 'python -m benchmarks.step_roofline ' + ' '.join(sys.argv[1:])
    name = f'step_roofline_{shape}' + ('_moe' if _MOE.value else '')
    if _MOE.value and result['moe_config']['gmm_impl'] != 'auto':  # e.g. --config.moe.gmm_impl=blas
      name += '_' + result['moe_config']['gmm_impl']
    print(f'wrote {common.write_result(name, result)}')


if __name__ == '__main__':
  _define_flags()
  app.run(main)
