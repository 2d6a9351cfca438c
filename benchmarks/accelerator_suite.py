"""Claims on one accelerator, in one run: dense and MoE MFU, grouped-matmul kernels, routing
attention against flash attention (issue targets in docs/performance.md).

Usage: python -m benchmarks.accelerator_suite [--cpu_smoke] [--out=FILE] [--batch=B]
- `dense`: the ~125M dense model of configs/base.py (12 layers, width 768, sequence 1024, bf16)
  training at `--batch`: tokens/s, MFU against the device's datasheet peak and against the matmul
  peak measured here (`matmul_tflops`, a large bf16 GEMM).
- `moe`: the same model with 8 experts, top-2, expert hidden = mlp_dim / 2 (equal active FLOPs):
  MFU over active FLOPs and `mfu_vs_dense`.
- `grouped_matmul`: every grouped-matmul kernel available here (`model.gmm`, through
  `model.moe.experts_dropless`),
  forward + backward at the MoE layer's shapes: TFLOP/s and the ratio to a dense GEMM of equal FLOPs.
- `routing_attention`: forward + backward of one routing-attention function (all heads routing)
  against causal attention of the same heads (`model.attention.causal_attention`, the platform's
  kernel) for L from 4k to 32k: milliseconds each.
`--cpu_smoke` runs every part at toy sizes in seconds (tests/test_accelerator_suite.py runs it),
so the suite cannot rot between device sessions; its JSON goes to `--out` only. A full run writes
benchmarks/results/accelerator_suite.json with the device, versions and the command. At most about
8 minutes on one H100/H200.
"""

import dataclasses
import json
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from benchmarks import common
from configs import base, schema, sharding
from model import gmm, moe, plan
from model.attention import attention_impl, causal_attention
from model.routing_attention import routing_attention
from train import mesh as mesh_lib
from train.step import make_step_fns

# dense bf16 datasheet peaks per device (FLOP/s); a device not listed gets no datasheet MFU
PEAKS = {'H100': 989e12, 'H200': 989e12, 'A100': 312e12, 'TPU v5p': 459e12, 'TPU v5 lite': 197e12}


@dataclasses.dataclass(frozen=True)
class Sizes:
  d_model: int
  num_layers: int
  num_heads: int
  mlp_dim: int
  seq_len: int
  batch: int
  dtype: str
  gmm_tokens: int
  gemm: int
  routing_lengths: tuple[int, ...]
  routing_heads: int
  routing_window: int


FULL = Sizes(
  768, 12, 12, 3072, 1024, 32, 'bfloat16', 8192, 8192, (4096, 8192, 16384, 32768), 8, 256
)
SMOKE = Sizes(64, 2, 4, 128, 32, 8, 'float32', 128, 128, (128,), 2, 32)


def _peak() -> tuple[str, float | None]:
  kind = getattr(jax.devices()[0], 'device_kind', jax.devices()[0].platform)
  for name, peak in PEAKS.items():
    if name in kind:
      return kind, peak
  return kind, None


def _blocked_ms(fn, reps: int) -> float:
  return 1e3 * float(np.median(common.time_calls(lambda: jax.block_until_ready(fn()), reps, 1)))


def matmul_tflops(n: int, dtype, reps: int = 5) -> float:
  """The measured matmul peak: an n×n×n GEMM in `dtype`."""
  a = jnp.ones((n, n), dtype)
  f = jax.jit(lambda x: x @ x)
  return 2 * n**3 / (_blocked_ms(lambda: f(a), reps) * 1e-3) / 1e12


def _config(s: Sizes, experts: int = 0) -> schema.Config:
  c = base.get_config()
  c.model.update(
    num_layers=s.num_layers,
    d_model=s.d_model,
    num_heads=s.num_heads,
    num_kv_heads=s.num_heads,
    mlp_dim=s.mlp_dim,
    dtype=s.dtype,
  )
  if experts:
    c.moe.update(num_experts=experts, top_k=2, expert_dim=s.mlp_dim // 2)
  c.train.update(batch_size=s.batch, seq_len=s.seq_len, steps=100, peak_tflops=0.0)
  c.mesh.update(shape=(-1, 1, 1, 1), rules='dp')
  c.optimizer.update(warmup_steps=1)
  return schema.load(c, jax.device_count())


def train_rate(cfg: schema.Config, steps: int) -> dict:
  """Tokens/s of the bare jitted train step on random tokens, and the FLOPs behind them."""
  fns = make_step_fns(cfg, mesh_lib.make_mesh(cfg.mesh), sharding.rules(cfg.mesh.rules))
  rng = np.random.default_rng(0)
  toks = rng.integers(0, 256, (cfg.train.batch_size, cfg.train.seq_len + 1), dtype=np.int32)
  batch = jax.device_put({'inputs': toks[:, :-1], 'targets': toks[:, 1:]}, fns.batch_sharding)
  state = fns.init()
  for _ in range(2):
    state, metrics = fns.train_step(state, batch)
  jax.block_until_ready(metrics)
  t0 = time.perf_counter()
  for _ in range(steps):
    state, metrics = fns.train_step(state, batch)
  jax.block_until_ready((state, metrics))
  tokens_per_sec = steps * cfg.train.batch_size * cfg.train.seq_len / (time.perf_counter() - t0)
  layer_plan = plan.build(cfg.model, cfg.train.seq_len)
  return {
    'params_M': layer_plan.params / 1e6,
    'batch': cfg.train.batch_size,
    'seq_len': cfg.train.seq_len,
    'tokens_per_sec': tokens_per_sec,
    'flops_per_sec': tokens_per_sec * layer_plan.flops_per_token,
  }


def _mfu(row: dict, datasheet: float | None, measured: float) -> dict:
  devices = jax.device_count()
  row['mfu'] = row['flops_per_sec'] / (datasheet * devices) if datasheet else None
  row['mfu_vs_measured_matmul'] = row['flops_per_sec'] / (measured * 1e12 * devices)
  return row


def grouped_matmul(s: Sizes, reps: int = 5) -> dict:
  """Forward + backward of the dropless experts with each available kernel, against a dense GEMM
  chain of equal FLOPs (the same tokens through one expert-sized SwiGLU, k times)."""
  e, k, d, f, t = 8, 2, s.d_model, s.mlp_dim // 2, s.gmm_tokens
  dtype = jnp.dtype(s.dtype)
  keys = jax.random.split(jax.random.key(0), 5)
  x = jax.random.normal(keys[0], (t, d), dtype)
  ws = [
    jax.random.normal(kk, shape, dtype) * 0.02
    for kk, shape in zip(keys[1:4], ((e, d, f), (e, d, f), (e, f, d)))
  ]
  experts = jax.random.randint(keys[4], (t, k), 0, e)
  weights = jnp.full((t, k), 1.0 / k, dtype)
  flops = 3 * 2 * 3 * t * k * d * f  # fwd + bwd (3x) of three matmuls per assignment

  def dense(x, wg, wu, wd):
    xs = jnp.repeat(x, k, axis=0)
    return (jax.nn.silu(xs @ wg[0]) * (xs @ wu[0])) @ wd[0]

  loss = lambda fn: jax.jit(
    jax.grad(lambda x, *w: jnp.sum(fn(x, *w).astype(jnp.float32)), argnums=(0, 1, 2, 3))
  )
  base_ms = _blocked_ms(lambda g=loss(dense): g(x, *ws), reps)
  out = {'dense_gemm': {'tflops': flops / (base_ms * 1e-3) / 1e12, 'ms': base_ms}}
  for impl in available_gmm_impls():
    fn = lambda x, *w, impl=impl: moe.experts_dropless(x, weights, experts, *w, impl=impl)
    ms = _blocked_ms(lambda g=loss(fn): g(x, *ws), reps)
    out[impl] = {'tflops': flops / (ms * 1e-3) / 1e12, 'ms': ms, 'vs_dense_gemm': base_ms / ms}
  return out


def available_gmm_impls() -> list[str]:
  """The grouped-matmul kernels this process can run (`model.gmm`), ragged_dot only where it is
  not the dense fallback (not on GPU)."""
  platform = jax.default_backend()
  impls = [
    impl for impl in ('scan', 'megablox', 'mgpu', 'tokamax') if gmm.missing(impl, platform) is None
  ]
  return impls + ([] if platform == 'gpu' else ['ragged_dot'])


def routing_vs_flash(s: Sizes, reps: int = 3) -> list[dict]:
  """Forward + backward of routing attention (every head routing) and of causal attention of
  the same heads, for each sequence length."""
  rows, dtype, h, kd = [], jnp.dtype(s.dtype), s.routing_heads, 64 if s is FULL else 16
  impl = attention_impl('auto', dtype)
  for length in s.routing_lengths:
    keys = jax.random.split(jax.random.key(length), 3)
    q = jax.random.normal(keys[0], (1, length, h, kd), dtype)
    v = jax.random.normal(keys[1], (1, length, h, kd), dtype)
    means = jax.random.normal(keys[2], (h, length // s.routing_window, kd), jnp.float32)
    routed = jax.jit(
      jax.grad(
        lambda q, v: jnp.sum(
          routing_attention(q, q, v, means, window=s.routing_window).out_BLHK.astype(jnp.float32)
        ),
        argnums=(0, 1),
      )
    )
    flash = jax.jit(
      jax.grad(
        lambda q, v: jnp.sum(causal_attention(q, q, v, impl=impl).astype(jnp.float32)),
        argnums=(0, 1),
      )
    )
    rows.append(
      {
        'L': length,
        'routing_ms': _blocked_ms(lambda: routed(q, v), reps),
        'flash_ms': _blocked_ms(lambda: flash(q, v), reps),
        'flash_impl': impl,
      }
    )
  return rows


def suite(s: Sizes, steps: int, reps: int = 5) -> dict:
  """Every part at sizes `s`: `steps` timed train steps, medians of `reps` timed calls."""
  kind, datasheet = _peak()
  measured = matmul_tflops(s.gemm, jnp.dtype(s.dtype), reps)
  dense = _mfu(train_rate(_config(s), steps), datasheet, measured)
  moe_row = _mfu(train_rate(_config(s, experts=8), steps), datasheet, measured)
  moe_row['mfu_vs_dense'] = moe_row['mfu_vs_measured_matmul'] / dense['mfu_vs_measured_matmul']
  return {
    'device_kind': kind,
    'datasheet_peak_tflops': datasheet / 1e12 if datasheet else None,
    'matmul_tflops': measured,
    'dense': dense,
    'moe': moe_row,
    'grouped_matmul': grouped_matmul(s, reps),
    'routing_attention': routing_vs_flash(s, reps),
  }


def _define_flags() -> None:
  """The command-line flags, defined only when run as a program (importing this module, as the
  tests do, defines none, so several benchmarks can be imported into one process)."""
  global _SMOKE, _OUT, _BATCH, _STEPS
  _SMOKE = flags.DEFINE_bool('cpu_smoke', False, 'Every part at toy sizes on CPU, in seconds.')
  _OUT = flags.DEFINE_string('out', None, 'Write the JSON here (a smoke run writes nowhere else).')
  _BATCH = flags.DEFINE_integer('batch', 32, 'Sequences per step of the dense and MoE models.')
  _STEPS = flags.DEFINE_integer('steps', 10, 'Timed train steps.')


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  if _SMOKE.value and jax.default_backend() != 'cpu':
    print('error: --cpu_smoke runs on CPU devices only (JAX_PLATFORMS=cpu)', file=sys.stderr)
    sys.exit(1)
  sizes = SMOKE if _SMOKE.value else dataclasses.replace(FULL, batch=_BATCH.value)
  t0 = time.perf_counter()
  result = suite(sizes, 2, 1) if _SMOKE.value else suite(sizes, _STEPS.value)
  result.update(
    command=' '.join(sys.argv),
    smoke=_SMOKE.value,
    sizes=dataclasses.asdict(sizes),
    wall_s=round(time.perf_counter() - t0, 1),
  )
  text = json.dumps(result)
  print(text)
  if _OUT.value:
    with open(_OUT.value, 'w') as f:
      f.write(text + '\n')
  if not _SMOKE.value:
    print(f'wrote {common.write_result("accelerator_suite", result)}', file=sys.stderr)


if __name__ == '__main__':
  _define_flags()
  app.run(main)
