"""AdamW with warmup + decay schedule, global-norm clipping and a weight-decay mask."""

import jax
import optax

from configs.schema import OptimizerConfig

# Parameters whose name is one of these are never decayed (norm scales, biases).
NO_DECAY_NAMES = ('scale', 'bias')


def learning_rate_schedule(cfg: OptimizerConfig, total_steps: int) -> optax.Schedule:
  """Linear warmup from 0 to the peak, then cosine/linear/constant decay to min_lr_ratio·peak."""
  peak, final = cfg.learning_rate, cfg.learning_rate * cfg.min_lr_ratio
  decay_steps = max(total_steps - cfg.warmup_steps, 1)
  if cfg.decay == 'cosine':
    after = optax.cosine_decay_schedule(peak, decay_steps, alpha=cfg.min_lr_ratio)
  elif cfg.decay == 'linear':
    after = optax.linear_schedule(peak, final, decay_steps)
  else:
    after = optax.constant_schedule(peak)
  warmup = optax.linear_schedule(0.0, peak, cfg.warmup_steps)
  return optax.join_schedules([warmup, after], [cfg.warmup_steps])


def _decays(path) -> bool:
  keys = [str(getattr(k, 'key', getattr(k, 'name', ''))) for k in path]
  named = [k for k in keys if k != 'value']
  return not (named and named[-1] in NO_DECAY_NAMES) and not any('norm' in k for k in named)


def decay_mask(params):
  """True for parameters that get weight decay: matrices and embeddings, not norms or biases."""
  return jax.tree_util.tree_map_with_path(lambda path, _: _decays(path), params)


def make_optimizer(cfg: OptimizerConfig, total_steps: int) -> optax.GradientTransformation:
  schedule = learning_rate_schedule(cfg, total_steps)
  adamw = optax.adamw(
    schedule, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay, mask=decay_mask
  )
  if cfg.grad_clip > 0:
    return optax.chain(optax.clip_by_global_norm(cfg.grad_clip), adamw)
  return adamw
