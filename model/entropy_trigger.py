"""Entropy-triggered routing (docs/moe.md, after MAGNET): coverage first, then specialisation.

A router's full distribution over experts (before top-k) gives two normalised entropies:
H_tok, the mean per-token entropy (routing confidence: 1 = uniform, 0 = one-hot), and H_use, the
entropy of the mean distribution (coverage: 1 = every expert used equally). The loss
`(1 - w) * L_cov + w * L_spec` first keeps routing soft and usage spread
(`L_cov = -beta_use*H_use - beta_tok*H_tok`), then sharpens each token while usage stays spread
(`L_spec = -beta_use*H_use + beta_tok*H_tok`, i.e. it raises the token-expert mutual information
H_use - H_tok). The switch is a latched trigger on an EMA of H_tok: it fires when the EMA drops
below `tau` or changes by less than `plateau` over `plateau_window` steps, and `w` then ramps
linearly from 0 to 1 over `ramp_steps`.

Pure core: `routing_probs`, `routing_entropies`, `TriggerState` with `init_trigger`,
`update_trigger`, `ramp_weight`, `entropy_loss`, and `share_across_layers` (mode 'global').
Module shell: `EntropyMonitor`, which any routed layer (MoE router, UoE gates) owns and calls with
its probabilities; it keeps the trigger state as `axes.RoutingState` (checkpointed, never a
gradient target) and advances it in `update_state` after the gradient.
"""

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from model import axes, router
from model.config import EntropyConfig
from model.validity import masked_mean

# Key of a monitor's statistics inside its layer's aux['stats'] (how mode 'global' finds them).
STATS_KEY = 'entropy'


def routing_probs(logits_TE: jax.Array, score: str = 'softmax') -> jax.Array:
  """The router's full distribution over experts in f32: softmax, or sigmoid scores normalised
  per token. Pass logits WITHOUT the loss-free bias (it selects experts, it is not the router)."""
  s_TE = router.scores(logits_TE, score)
  return s_TE if score == 'softmax' else s_TE / jnp.maximum(s_TE.sum(-1, keepdims=True), 1e-9)


def _plogp(p: jax.Array) -> jax.Array:
  """p * log p with 0 at p = 0 and a finite (zero) gradient there."""
  positive = p > 0
  return jnp.where(positive, p * jnp.log(jnp.where(positive, p, 1.0)), 0.0)


def routing_entropies(
  probs_TE: jax.Array, valid_T: jax.Array | None = None
) -> tuple[jax.Array, jax.Array]:
  """(H_tok, H_use): mean token entropy and entropy of the mean distribution, both / log E, f32,
  over the valid tokens (`valid_T`; all when None).

  Differentiable. The means run over the global token axis: under GSPMD (sharding constraints
  inside one jit) a plain mean over a data-sharded axis IS the reduction over the data-parallel
  shards (XLA inserts the all-reduce), so no psum is needed; a shard_map caller would psum.
  """
  probs_TE = probs_TE.astype(jnp.float32)
  e = probs_TE.shape[-1]
  norm = math.log(e) if e > 1 else 1.0  # one expert: both entropies are 0
  h_tok = -masked_mean(jnp.sum(_plogp(probs_TE), axis=-1), valid_T) / norm
  h_use = -jnp.sum(_plogp(masked_mean(probs_TE, valid_T))) / norm
  return h_tok, h_use


def entropy_loss(
  h_tok: jax.Array, h_use: jax.Array, w: jax.Array, beta_tok: float, beta_use: float
) -> jax.Array:
  """(1 - w) * L_coverage + w * L_specialisation, with w in [0, 1] the ramp weight."""
  coverage = -beta_use * h_use - beta_tok * h_tok
  specialisation = -beta_use * h_use + beta_tok * h_tok
  return (1.0 - w) * coverage + w * specialisation


class TriggerState(NamedTuple):
  """One monitor's trigger state (scalars, plus the EMA history for the plateau test).

  `step` counts updates (= optimizer steps); `trigger_step` is the update at which the trigger
  fired, -1 before (it is also the latched flag: fired <=> trigger_step >= 0). `history_W` is a
  ring buffer: slot `u % W` holds the EMA after update u, so the EMA of W updates ago is read in
  O(1) before it is overwritten.
  """

  ema: jax.Array
  trigger_step: jax.Array
  step: jax.Array
  history_W: jax.Array


def init_trigger(window: int) -> TriggerState:
  return TriggerState(
    ema=jnp.ones((), jnp.float32),
    trigger_step=jnp.full((), -1, jnp.int32),
    step=jnp.zeros((), jnp.int32),
    history_W=jnp.zeros((window,), jnp.float32),
  )


def update_trigger(state: TriggerState, h_tok: jax.Array, cfg: EntropyConfig) -> TriggerState:
  """Advances the state by one step's H_tok (pure, jit-safe, no branching on traced values).

  EMA: starts at the first value, then `ema_decay * ema + (1 - ema_decay) * h_tok`. The trigger
  fires at update t when EMA_t < tau, or when t > W and |EMA_t - EMA_{t-W}| < plateau; once
  fired it never un-fires (trigger_step is kept).
  """
  h_tok = jnp.asarray(h_tok, jnp.float32).reshape(())
  step = state.step + 1
  ema = jnp.where(state.step == 0, h_tok, cfg.ema_decay * state.ema + (1.0 - cfg.ema_decay) * h_tok)
  window = state.history_W.shape[0]
  slot = step % window
  ema_window_ago = state.history_W[slot]  # EMA after update step - W (valid when step > W)
  plateau = (step > window) & (jnp.abs(ema - ema_window_ago) < cfg.plateau)
  fire = (state.trigger_step < 0) & ((ema < cfg.tau) | plateau)
  return TriggerState(
    ema=ema,
    trigger_step=jnp.where(fire, step, state.trigger_step),
    step=step,
    history_W=state.history_W.at[slot].set(ema),
  )


def ramp_weight(state: TriggerState, ramp_steps: int) -> jax.Array:
  """Weight of the specialisation loss for the next step: 0 until the trigger, then
  `(step - trigger_step) / ramp_steps` clipped to 1 (the step right after firing uses 0; the one
  `ramp_steps` later uses 1). A function of the state only: no gradient flows through it."""
  since = (state.step - state.trigger_step).astype(jnp.float32)
  w = jnp.clip(since / ramp_steps, 0.0, 1.0)
  return jax.lax.stop_gradient(jnp.where(state.trigger_step >= 0, w, 0.0))


def share_across_layers(stats):
  """Mode 'global': every monitor's H_tok statistic replaced by the mean over all monitors.

  Every layer then runs the same state machine on the same input (the EMA of the mean is the
  mean of the EMAs), so all layers fire at the same step, when the mean EMA over layers crosses.
  Works on the model's whole aux['stats'] (scanned stages stack layers on a leading axis).
  """

  def is_h_tok(path) -> bool:
    keys = [getattr(k, 'key', None) for k in path]
    return keys[-2:] == [STATS_KEY, 'h_tok']

  leaves = [x for path, x in jax.tree_util.tree_flatten_with_path(stats)[0] if is_h_tok(path)]
  if not leaves:
    return stats
  flat = jnp.concatenate([jnp.reshape(x, (-1,)) for x in leaves])
  mean = jnp.mean(flat.astype(jnp.float32))
  return jax.tree_util.tree_map_with_path(
    lambda path, x: jnp.full_like(x, mean) if is_h_tok(path) else x, stats
  )


class EntropyMonitor(nnx.Module):
  """Trigger state of one router, as RoutingState, and its entropy loss.

  `monitor(probs_TE) -> (loss, metrics, stats)`: the entropy loss with this step's ramp weight,
  metrics {'h_tok', 'h_use', 'h_tok_ema', 'trigger_step', 'ramp_weight', 'entropy_loss'} (the
  state ones as they were when this step started) and stats {'h_tok'} for `update_state`.
  A layer puts the stats under `STATS_KEY` in its aux['stats'] and calls `update_state` with them.
  """

  def __init__(self, cfg: EntropyConfig):
    self.cfg = cfg
    init = init_trigger(cfg.plateau_window)
    # Scalars are stored as shape (1,): routing state must have rank >= 1 to stack over layers.
    self.ema = axes.routing_state(init.ema.reshape(1), (None,))
    self.trigger_step = axes.routing_state(init.trigger_step.reshape(1), (None,))
    self.step = axes.routing_state(init.step.reshape(1), (None,))
    self.history = axes.routing_state(init.history_W, (None,))

  def state(self) -> TriggerState:
    return TriggerState(
      self.ema[...][0], self.trigger_step[...][0], self.step[...][0], self.history[...]
    )

  def __call__(
    self, probs_TE: jax.Array, valid_T: jax.Array | None = None
  ) -> tuple[jax.Array, dict, dict]:
    c, state = self.cfg, self.state()
    h_tok, h_use = routing_entropies(probs_TE, valid_T)
    w = ramp_weight(state, c.ramp_steps)
    loss = entropy_loss(h_tok, h_use, w, c.beta_tok, c.beta_use)
    metrics = {
      'h_tok': h_tok,
      'h_use': h_use,
      'h_tok_ema': state.ema,
      'trigger_step': state.trigger_step,
      'ramp_weight': w,
      'entropy_loss': loss,
    }
    metrics = {k: jax.lax.stop_gradient(v).astype(jnp.float32) for k, v in metrics.items()}
    return loss, metrics, {'h_tok': jax.lax.stop_gradient(h_tok)}

  def update_state(self, stats: dict) -> None:
    new = update_trigger(self.state(), stats['h_tok'], self.cfg)
    self.ema[...] = new.ema.reshape(1)
    self.trigger_step[...] = new.trigger_step.reshape(1)
    self.step[...] = new.step.reshape(1)
    self.history[...] = new.history_W
