"""The JAX workers of `benchmarks.peer_step`: our train step and nanodo's, timed on request.

Run as `python -m benchmarks.peer_jax project|nanodo '<json args>'` by the driver (or in-process
by the tests): build and warm up, say ready with the model's facts as one JSON line on the
protocol stream, then answer each {"steps": n} line with the n steps' wall times.
"""

import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from benchmarks import common, peer_protocol
from benchmarks import step_roofline as sr
from configs import demo
from model import plan


def _tokens_BL(spec: dict):
  rng = np.random.default_rng(0)
  return rng.integers(0, spec['vocab'], (spec['batch'], spec['seq'] + 1)).astype(np.int32)


def project_step(cfg):
  """(step, info): our jitted train step on one random batch, state carried, outputs awaited."""
  step = sr.random_batch_step(cfg)[0]
  n_params = plan.build(cfg.model, cfg.train.seq_len).params  # equal to the built model's (tested)
  return step, {'params': n_params, 'class': 'ours (train.step.make_step_fns)'}


def nanodo_step(spec: dict, src: str):
  """(step, info): nanodo's TransformerDo (GELU MLP of width 1.5 x mlp) + optax AdamW, jitted."""
  sys.path.insert(0, os.path.abspath(src))
  from nanodo import model as nanodo_model  # pylint: disable=g-import-not-at-top

  width = spec['mlp'] * 3 // 2  # 2 matmuls of D x 1.5F = SwiGLU's 3 of D x F
  docfg = nanodo_model.DoConfig(
    D=spec['d'], H=spec['heads'], L=spec['seq'], N=spec['layers'], V=spec['vocab'], F=width,
    dtype=jnp.float32, fsdp_enabled=False,
  )  # fmt: skip
  net = nanodo_model.TransformerDo(docfg)
  toks_BL = jnp.asarray(_tokens_BL(spec))
  x_BL, y_BL = toks_BL[:, :-1], toks_BL[:, 1:]
  tx = optax.adamw(spec['lr'], b1=spec['b1'], b2=spec['b2'], eps=spec['eps'],
                   weight_decay=spec['weight_decay'])  # fmt: skip
  params = jax.jit(net.init)(jax.random.key(0), x_BL)['params']
  opt_state = jax.jit(tx.init)(params)

  def loss_fn(p, x_BL, y_BL):
    logits_BLV = net.apply({'params': p}, x_BL)
    return optax.softmax_cross_entropy_with_integer_labels(logits_BLV, y_BL).mean()

  def train_step(p, s, x_BL, y_BL):
    loss, grads = jax.value_and_grad(loss_fn)(p, x_BL, y_BL)
    updates, s = tx.update(grads, s, p)
    return optax.apply_updates(p, updates), s, loss

  train_step = jax.jit(train_step, donate_argnums=(0, 1))  # as ours: the old state donated
  state = [params, opt_state]
  n_params = sum(x.size for x in jax.tree.leaves(params))

  def step():
    state[0], state[1], loss = train_step(state[0], state[1], x_BL, y_BL)
    jax.block_until_ready((state[0], state[1], loss))

  note = f'GELU MLP of width {width} = 1.5 x {spec["mlp"]}; + learned positions (L x D params)'
  return step, {'params': n_params, 'class': 'nanodo.model.TransformerDo', 'note': note}


def time_steps(step, n: int) -> list[float]:
  """Wall seconds of each of n synchronised steps (no untimed warm-up: `warm` did it)."""
  return common.time_calls(step, n, warmup=0)


def warm(make_step, warmup_steps: int = 3):
  """(step, info) with the time to the first step (build, compile, run) and a few more steps."""
  t0 = time.perf_counter()
  step, info = make_step()
  step()
  info['first_step_s'] = time.perf_counter() - t0
  time_steps(step, warmup_steps)
  return step, info


def worker(system: str, args: dict) -> None:
  """A JAX worker: warm up, say ready on the protocol stream, then time steps on request."""
  proto = peer_protocol.protocol_stream()
  t0 = time.perf_counter()
  if system == 'project':
    cfg = sr.build_config(demo.get_config(), args['shape'], args['moe'])
    step, info = warm(lambda: project_step(cfg))
  else:
    step, info = warm(lambda: nanodo_step(args['spec'], args['nanodo_src']))
  info.update(ready=True, build_and_warmup_s=time.perf_counter() - t0)
  peer_protocol.serve(proto, info, lambda n: time_steps(step, n))


if __name__ == '__main__':
  worker(sys.argv[1], json.loads(sys.argv[2]))
