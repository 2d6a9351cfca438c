"""Train state, its shardings, and the one jitted train step.

The state is a plain dict `{'model': nnx.State, 'opt': nnx.State}` so that it is a pytree that
`jax.jit` donates and Orbax saves. `init_state` and `train_step` are plain functions of explicit
arguments; `make_step_fns` jits each once, with the state's shardings (and donation for the step),
and returns them in `StepFns` beside the graph definitions and shardings, which never change.
"""

import dataclasses
import functools
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding

from configs.schema import Config
from model import axes
from model.transformer import Transformer
from train import mesh as mesh_lib
from train.optimizer import learning_rate_schedule, make_optimizer


def build_model(cfg: Config, seed: int | None = None) -> Transformer:
  return Transformer(cfg.model, rngs=nnx.Rngs(cfg.train.seed if seed is None else seed))


def _build(cfg: Config) -> tuple[Transformer, nnx.Optimizer]:
  model = build_model(cfg)
  return model, nnx.Optimizer(model, make_optimizer(cfg.optimizer, cfg.train.steps), wrt=nnx.Param)


def lm_loss(logits_BLV: jax.Array, targets_BL: jax.Array, weights_BL: jax.Array | None = None):
  """Mean next-token cross-entropy in f32 over the tokens with nonzero weight."""
  ce_BL = optax.softmax_cross_entropy_with_integer_labels(
    logits_BLV.astype(jnp.float32), targets_BL
  )
  if weights_BL is None:
    return ce_BL.mean()
  return (ce_BL * weights_BL).sum() / jnp.maximum(weights_BL.sum(), 1.0)


def model_loss(model: Transformer, batch: dict) -> tuple[jax.Array, tuple[jax.Array, dict]]:
  """Training objective: LM loss plus the routed layers' weighted auxiliary losses."""
  logits, aux = model(
    batch['inputs'], positions_BL=batch.get('positions'), segment_ids_BL=batch.get('segment_ids')
  )
  lm = lm_loss(logits, batch['targets'], batch.get('weights'))
  return lm + aux['loss'], (lm, aux)


def all_finite(tree) -> jax.Array:
  """True when every floating-point leaf of `tree` is finite (one fused reduction)."""
  leaves = [x for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.floating)]
  return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves])) if leaves else True


def with_shardings(abstract, shardings):
  """ShapeDtypeStructs of `abstract` placed on `shardings`: restore targets (no host copy)."""
  return jax.tree.map(
    lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings
  )


@dataclasses.dataclass(frozen=True)
class StepFns:
  """One run's graph definitions, shardings and jitted functions (`make_step_fns`).

  `init()` -> a fresh state; `train_step(state, batch)` -> (state, metrics), donating `state`.
  """

  model_def: nnx.GraphDef
  opt_def: nnx.GraphDef
  abstract: dict  # {'model', 'opt'}: shapes and dtypes of the state
  state_shardings: dict
  batch_sharding: NamedSharding
  init: Callable[[], dict]
  train_step: Callable[[dict, dict], tuple[dict, dict]]

  def abstract_state(self) -> dict:
    """Shape/dtype/sharding targets of the state, for restoring a checkpoint without a copy."""
    return with_shardings(self.abstract, self.state_shardings)

  def model(self, state: dict) -> Transformer:
    return nnx.merge(self.model_def, state['model'])


def init_state(cfg: Config, mesh: Mesh, rules: dict) -> dict:
  """A fresh train state: the model at `train.seed`, the optimizer at step 0."""
  with axes.axis_rules(mesh, rules):
    model, opt = _build(cfg)
    return {'model': nnx.state(model), 'opt': nnx.state(opt)}


class Gradients(NamedTuple):
  grads: nnx.State
  loss: jax.Array  # the training objective: LM loss plus auxiliary losses
  lm_loss: jax.Array
  aux: dict  # the model's aux: 'loss', 'metrics', 'stats'


def _grads(grad_fn, params, batch: dict, accum: int) -> Gradients:
  """Gradients and losses of `batch`, averaged over `accum` equal microbatches (a scan)."""
  if accum == 1:
    (loss, (lm, aux)), grads = grad_fn(params, batch)
    return Gradients(grads, loss, lm, aux)
  micro = jax.tree.map(lambda x: x.reshape(accum, x.shape[0] // accum, *x.shape[1:]), batch)

  def body(carry, mb):
    (loss, (lm, aux)), g = grad_fn(params, mb)
    return jax.tree.map(jnp.add, carry, (g, loss, lm, aux)), None

  zero_aux = jax.eval_shape(lambda: grad_fn(params, jax.tree.map(lambda x: x[0], micro))[0][1][1])
  zeros = jax.tree.map(
    lambda s: jnp.zeros(s.shape, s.dtype), (params, jnp.float32(0), jnp.float32(0), zero_aux)
  )
  (grads, loss, lm, aux), _ = jax.lax.scan(body, zeros, micro)
  return Gradients(*jax.tree.map(lambda x: x / accum, (grads, loss, lm, aux)))


def train_step(
  state: dict,
  batch: dict,
  *,
  cfg: Config,
  mesh: Mesh,
  rules: dict,
  model_def: nnx.GraphDef,
  opt_def: nnx.GraphDef,
) -> tuple[dict, dict]:
  """One optimizer step on `batch` (`train.grad_accum` microbatches): (new state, metrics).

  Gradient, then the routing state from the forward statistics, then the optimizer update; a
  step whose loss, gradient or new state is not finite returns `state` unchanged ('finite' says
  which). Jit it with `make_step_fns`, which binds the keyword arguments.
  """
  with axes.axis_rules(mesh, rules):
    # merge() shares Variables with `state` and update() mutates them: keep the old arrays.
    old_leaves, treedef = jax.tree.flatten(state)
    step_before = state['opt']['step'][...]
    model = nnx.merge(model_def, state['model'])
    optimizer = nnx.merge(opt_def, state['opt'])
    graph, params, rest = nnx.split(model, nnx.Param, ...)

    def loss_of(p, micro):
      return model_loss(nnx.merge(graph, p, rest, copy=True), micro)

    grad_fn = jax.value_and_grad(loss_of, has_aux=True)
    grads, loss, lm, aux = _grads(grad_fn, params, batch, cfg.train.grad_accum)
    grad_norm = optax.tree.norm(grads)
    # Non-gradient routing state (centroids, balancing biases, ...): updated once per step from
    # the forward statistics, outside the gradient and never during rematerialisation.
    model.update_state(jax.lax.stop_gradient(aux['stats']))
    optimizer.update(model, grads)
    new_state = {'model': nnx.state(model), 'opt': nnx.state(optimizer)}
    # Non-finite guard on the loss, the gradient AND the new state (an overflowing update can
    # make finite gradients into infinite weights): a bad step leaves the state untouched, so no
    # checkpoint is ever poisoned.
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm) & all_finite(new_state)
    new_state = jax.tree.unflatten(
      treedef, [jnp.where(finite, n, o) for n, o in zip(jax.tree.leaves(new_state), old_leaves)]
    )
    schedule = learning_rate_schedule(cfg.optimizer, cfg.train.steps)
    metrics = {
      'loss': loss,
      'lm_loss': lm,
      'aux_loss': aux['loss'],
      'grad_norm': grad_norm,
      'learning_rate': schedule(step_before),
      'finite': finite,
      **aux['metrics'],
      **_count_metrics(model, aux['stats']),
    }
    return new_state, metrics


def _count_metrics(model: Transformer, stats: dict) -> dict:
  """Count vectors (tokens per expert, per k-means cluster of each routing head): the logger sums
  them over its window into dead_experts, expert_load and cluster_load."""
  out = {}
  for i, layer_stats in model.layer_stats(stats).items():
    expert_counts_E = layer_stats.get('mlp', {}).get('expert_counts')
    if expert_counts_E is not None:
      out[f'layer_{i}/moe/expert_counts'] = expert_counts_E
    cluster_counts_HN = (layer_stats.get('attn') or {}).get('count_HN')
    if cluster_counts_HN is not None:
      out[f'layer_{i}/routing/cluster_counts'] = cluster_counts_HN
  return out


def make_step_fns(cfg: Config, mesh: Mesh, rules: dict) -> StepFns:
  """`init_state` and `train_step` of `cfg` jitted once on `mesh` (state sharded by `rules`, the
  batch over the data axes, the old state donated), with their graph definitions and shardings."""
  model, opt = nnx.eval_shape(lambda: _build(cfg))
  model_def, model_state = nnx.split(model)
  opt_def, opt_state = nnx.split(opt)
  shardings = {
    'model': axes.state_shardings(model_state, mesh, rules),
    'opt': axes.state_shardings(opt_state, mesh, rules),
  }
  batch_sharding = mesh_lib.batch_sharding(mesh, rules)
  step = functools.partial(
    train_step, cfg=cfg, mesh=mesh, rules=rules, model_def=model_def, opt_def=opt_def
  )
  return StepFns(
    model_def=model_def,
    opt_def=opt_def,
    abstract={'model': model_state, 'opt': opt_state},
    state_shardings=shardings,
    batch_sharding=batch_sharding,
    init=jax.jit(functools.partial(init_state, cfg, mesh, rules), out_shardings=shardings),
    train_step=jax.jit(
      step,
      in_shardings=(shardings, batch_sharding),
      out_shardings=(shardings, None),
      donate_argnums=0,
    ),
  )
