"""The routed feed-forward layer `registry.FEED_FORWARD['moe']`: router, experts, losses, metrics.

`MoE(cfg, rngs=...)(x_BLD) -> (y_BLD, aux)` with aux['loss'] the weighted Switch balance loss,
router z-loss, ERC loss (`model.erc`, its weight split over the MoE layers) and entropy-trigger
loss (`model.entropy_trigger`, when `entropy.enabled`) in f32, aux['metrics'] scalars named
`moe/...`, and aux['stats'] = {'expert_counts': assignments per expert over the whole (global)
batch, 'assign_BLE': which experts ran on each token (bool; dropped assignments excluded; read by
eval.segment_cache, dead code in the train step), 'entropy': this step's H_tok (when enabled)}.
`update_state` moves the loss-free balancing bias by those counts after the gradient, advances
the jitter and ERC noise keys and the entropy trigger. Expert choice picks per sequence.

Tokens with segment id 0 (`model.validity`) are invisible: never picked by expert choice, no
capacity slot, left out of every loss and count. Router jitter applies in training only
(`model.eval()` sets `deterministic`, as for dropout).
"""

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from model import axes, capacity, entropy_trigger, erc, moe, router, validity
from model.config import ModelConfig
from model.layers import MLP, init_normal


class MoE(nnx.Module):
  """Mixture of SwiGLU experts stacked [E, D, F] with logical axes (expert, embed, mlp)."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    self.cfg, m = cfg, cfg.moe
    e, d, f = m.num_experts, cfg.d_model, m.hidden(cfg.mlp_dim)
    pd = cfg.param_dtype
    self.router = axes.param(rngs, init_normal(cfg), (d, e), ('embed', None), pd)
    self.w_gate = axes.param(rngs, init_normal(cfg), (e, d, f), ('expert', 'embed', 'mlp'), pd)
    self.w_up = axes.param(rngs, init_normal(cfg), (e, d, f), ('expert', 'embed', 'mlp'), pd)
    self.w_down = axes.param(
      rngs, init_normal(cfg, output=True), (e, f, d), ('expert', 'mlp', 'embed'), pd
    )
    self.shared = (
      MLP(dataclasses.replace(cfg, mlp_dim=m.shared_experts * f), rngs=rngs)
      if m.shared_experts
      else None
    )
    self.bias = (
      axes.routing_state(jnp.zeros((e,), jnp.float32), ('expert',)) if m.bias_rate else None
    )
    # Raw key data as routing state, advanced in update_state: fresh noise every step.
    self.jitter_key = _key_state(rngs) if m.jitter else None
    self.erc_key = _key_state(rngs) if m.erc_weight else None
    self.entropy = entropy_trigger.EntropyMonitor(cfg.entropy) if cfg.entropy.enabled else None
    self.deterministic = False  # True (model.eval()): no router jitter

  @staticmethod
  def reads_future(cfg: ModelConfig) -> str | None:
    """Why the output at t can depend on tokens after t (None: it cannot; jitter is off in eval)."""
    m = cfg.moe
    if m.router == 'expert_choice':
      return 'expert-choice MoE: each expert takes its top-C tokens of the whole sequence'
    if m.execution == 'capacity' and not capacity.is_full(
      m.top_k, m.num_experts, m.capacity_factor
    ):
      return (
        'capacity execution: tokens of a sequence compete for C slots per expert (first '
        'choices of later tokens before second choices of earlier ones)'
      )
    return None

  METRICS = 'moe/'  # prefix of the per-layer metrics it reports
  GATED = True  # a learned router: the entropy trigger monitors it

  @staticmethod
  def num_params(cfg: ModelConfig) -> int:
    """Router D·E, E experts of 3·D·F, and the shared experts' MLP of 3·D·(shared·F)."""
    m, d = cfg.moe, cfg.d_model
    f = m.hidden(cfg.mlp_dim)
    return d * m.num_experts + 3 * d * f * (m.num_experts + m.shared_experts)

  @staticmethod
  def active_params(cfg: ModelConfig, seq_len: int) -> float:
    """Router plus the experts a token runs through: top_k + shared for token choice (dropped
    assignments not discounted); for expert choice the E·C slots of a sequence over its S
    tokens, plus shared."""
    m, d = cfg.moe, cfg.d_model
    f = m.hidden(cfg.mlp_dim)
    per_token = m.top_k
    if m.router == 'expert_choice':
      slots = capacity.capacity(seq_len, 1, m.num_experts, m.capacity_factor)
      per_token = m.num_experts * slots / seq_len
    return d * m.num_experts + 3 * d * f * (per_token + m.shared_experts)

  @staticmethod
  def describe(cfg: ModelConfig) -> str:
    m = cfg.moe
    if m.router == 'expert_choice':
      routed = f'expert choice over {m.num_experts} experts (capacity factor {m.capacity_factor})'
    else:
      routed = f'{m.score} top-{m.top_k} of {m.num_experts} experts, {m.execution}'
    shared = f' + {m.shared_experts} shared' if m.shared_experts else ''
    return f'MoE: {routed}{shared}, hidden {m.hidden(cfg.mlp_dim)}'

  def _logits(self, x_TD: jax.Array) -> jax.Array:
    """Router logits in f32, with multiplicative input jitter when configured."""
    x32_TD = x_TD.astype(jnp.float32)
    if self.jitter_key is not None and not self.deterministic:
      j = self.cfg.moe.jitter
      x32_TD = x32_TD * jax.random.uniform(
        self.jitter_key[...], x32_TD.shape, jnp.float32, 1.0 - j, 1.0 + j
      )
    return x32_TD @ self.router[...].astype(jnp.float32)

  def __call__(
    self, x_BLD: jax.Array, segment_ids_BL: jax.Array | None = None
  ) -> tuple[jax.Array, dict]:
    m, dtype = self.cfg.moe, jnp.dtype(self.cfg.dtype)
    b, l, d = x_BLD.shape
    x_TD = x_BLD.reshape(b * l, d).astype(dtype)
    valid_BL = validity.valid_tokens(segment_ids_BL, b, l)
    valid_T = None if segment_ids_BL is None else valid_BL.reshape(-1)
    logits_TE = self._logits(x_TD)
    ws = [w[...].astype(dtype) for w in (self.w_gate, self.w_up, self.w_down)]
    if m.router == 'expert_choice':
      out, y_TD = self._expert_choice(x_TD, logits_TE.reshape(b, l, -1), valid_BL, ws)
      assign_BLE = jax.vmap(expert_choice_assignment, in_axes=(0, 0, None))(
        out.indices, out.kept, l
      )
    else:
      bias_E = None if self.bias is None else self.bias[...]
      out = router.route_topk(
        logits_TE,
        m.top_k,
        score=m.score,
        bias_E=bias_E,
        renormalize=m.renormalize,
        valid_T=valid_T,
        convention=m.balance_convention,
      )
      kept_TK = None
      if m.execution == 'capacity':
        y_TD, dropped = moe.experts_capacity(
          x_TD, out.weights, out.indices, *ws, m.capacity_factor, num_groups=b, valid_T=valid_T
        )
        out = out._replace(dropped_fraction=dropped)
        kept_TK = moe.capacity_kept(
          out.indices, m.num_experts, m.capacity_factor, num_groups=b, valid_T=valid_T
        )
      else:
        y_TD = moe.experts_dropless(
          x_TD, out.weights, out.indices, *ws, impl=m.gmm_impl, block_size=m.block_size
        )
      assign_BLE = topk_assignment(out.indices, m.num_experts, kept_TK).reshape(b, l, -1)
      assign_BLE = assign_BLE & valid_BL[..., None]
    y_BLD = axes.constrain(y_TD.reshape(b, l, d), axes.RESIDUAL)
    if self.shared is not None:
      y_BLD = y_BLD + self.shared(x_BLD)
    loss = m.balance_weight * out.balance_loss + m.z_loss_weight * out.z_loss
    erc_loss, erc_metrics = self._erc()
    entropy_loss, entropy_metrics, stats = self._entropy(logits_TE, valid_T)
    return y_BLD, {
      'loss': (loss + erc_loss + entropy_loss).astype(jnp.float32),
      'metrics': {**self._metrics(out), **erc_metrics, **entropy_metrics},
      'stats': {'expert_counts': out.load_E, 'assign_BLE': assign_BLE, **stats},
    }

  def _entropy(
    self, logits_TE: jax.Array, valid_T: jax.Array | None
  ) -> tuple[jax.Array, dict, dict]:
    """Normalised routing entropies H_tok, H_use of the full distribution (bias excluded), always
    logged; with `entropy.enabled` also the trigger's loss, state metrics and stats.

    The entropy loss is per layer (summed over layers, like the balance and z-losses): the betas
    are per-layer coefficients, independent of depth.
    """
    probs_TE = entropy_trigger.routing_probs(logits_TE, self.cfg.moe.score)
    if self.entropy is None:
      h_tok, h_use = entropy_trigger.routing_entropies(probs_TE, valid_T)
      return jnp.zeros((), jnp.float32), {'moe/h_tok': h_tok, 'moe/h_use': h_use}, {}
    loss, metrics, stats = self.entropy(probs_TE, valid_T)
    return loss, {f'moe/{k}': v for k, v in metrics.items()}, {entropy_trigger.STATS_KEY: stats}

  def _erc(self) -> tuple[jax.Array, dict]:
    """Weighted ERC loss share of this layer (weight / number of MoE layers) and its metrics.

    The coupling level alpha* costs E^2·D·F per step, so it is a training metric only when ERC is
    on; for any MoE checkpoint it is computed from the weights by `erc.coupling_level`.
    """
    m, r_DE, wg_EDF = self.cfg.moe, self.router[...], self.w_gate[...]
    if self.erc_key is None:
      return jnp.zeros((), jnp.float32), {}
    metrics = {'moe/coupling_level': erc.coupling_level(r_DE, wg_EDF)}
    delta_ED = erc.erc_noise(self.erc_key[...], r_DE)
    loss = erc.erc_loss(
      r_DE, wg_EDF, alpha=m.erc_alpha, delta_ED=delta_ED, grad_to_router=m.erc_grad_to_router
    )
    metrics.update({'moe/erc_loss': loss, 'moe/erc_epsilon': erc.mean_epsilon(r_DE)})
    layers = sum(s.feed_forward == 'moe' for s in self.cfg.layer_specs())
    return m.erc_weight * loss / layers, metrics

  def _expert_choice(self, x_TD, logits_BLE, valid_BL, ws):
    """Each expert takes its top-C tokens of each sequence; losses and load over sequences.

    C follows the sequence's number of valid tokens: a padded prefix gets the slots it would get
    alone.
    """
    b, l, e = logits_BLE.shape
    formula = lambda n: capacity.capacity(n, 1, e, self.cfg.moe.capacity_factor)
    c = formula(l)
    used_B = validity.slots_for(formula, valid_BL.sum(-1), l)
    out = jax.vmap(lambda z, v, u: router.route_expert_choice(z, c, valid_T=v, used_capacity=u))(
      logits_BLE, valid_BL, used_B
    )
    y_BLD = jax.vmap(moe.experts_choice, in_axes=(0, 0, 0, None, None, None))(
      x_TD.reshape(b, l, -1), out.weights, out.indices, *ws
    )
    n_B = valid_BL.sum(-1).astype(jnp.float32)
    over_tokens = lambda v_B: jnp.sum(v_B * n_B) / jnp.maximum(n_B.sum(), 1.0)  # row -> token mean
    out = out._replace(
      load_E=out.load_E.sum(0),
      z_loss=over_tokens(out.z_loss),
      entropy=over_tokens(out.entropy),
      balance_loss=out.balance_loss.mean(),
      dropped_fraction=over_tokens(out.dropped_fraction),
    )
    return out, y_BLD.reshape(b * l, -1)

  def _metrics(self, out: router.RouterOutput) -> dict:
    load_E = out.load_E
    mean = jnp.maximum(load_E.mean(), 1e-9)
    metrics = {
      'moe/load_max_mean': load_E.max() / mean,
      'moe/load_cv': load_E.std() / mean,
      'moe/dropped_fraction': out.dropped_fraction,
      'moe/router_entropy': out.entropy,
      'moe/z_loss': out.z_loss,
      'moe/balance_loss': out.balance_loss,
    }
    if self.bias is not None:
      metrics['moe/bias_norm'] = jnp.linalg.norm(self.bias[...])
    return {k: v.astype(jnp.float32) for k, v in metrics.items()}

  def update_state(self, stats: dict) -> None:
    """Loss-free bias from this step's global loads; fresh noise keys; the entropy trigger."""
    if self.bias is not None:
      self.bias[...] = router.update_bias(
        self.bias[...], stats['expert_counts'], self.cfg.moe.bias_rate
      )
    if self.jitter_key is not None:
      self.jitter_key[...] = jax.random.fold_in(self.jitter_key[...], 1)
    if self.erc_key is not None:
      self.erc_key[...] = jax.random.fold_in(self.erc_key[...], 1)
    if self.entropy is not None:
      self.entropy.update_state(stats[entropy_trigger.STATS_KEY])


def topk_assignment(
  experts_TK: jax.Array, num_experts: int, kept_TK: jax.Array | None = None
) -> jax.Array:
  """[T, E] bool: the experts each token was sent to; assignments not kept (capacity) excluded."""
  hot_TKE = jax.nn.one_hot(experts_TK, num_experts, dtype=jnp.bool_)
  if kept_TK is not None:
    hot_TKE = hot_TKE & kept_TK[..., None]
  return hot_TKE.any(axis=1)


def expert_choice_assignment(tokens_EC: jax.Array, kept_EC: jax.Array, length: int) -> jax.Array:
  """[L, E] bool: token t is assigned to expert e when e picked it in a kept slot (unpicked
  tokens: no expert)."""
  e = tokens_EC.shape[0]
  experts_EC = jnp.broadcast_to(jnp.arange(e)[:, None], tokens_EC.shape)
  return (
    jnp.zeros((length, e), jnp.int32).at[tokens_EC, experts_EC].add(kept_EC.astype(jnp.int32)) > 0
  )


def _key_state(rngs: nnx.Rngs) -> axes.RoutingState:
  """A fresh PRNG key (raw key data) held as routing state."""
  key = rngs.params()
  if jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
    key = jax.random.key_data(key)
  return axes.routing_state(key, (None,))
