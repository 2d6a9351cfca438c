"""Union of Experts layers: `registry.ATTENTION['smha']` and `registry.FEED_FORWARD['uome']`.

Thin modules around `model.smha` and `model.uoe`. Their parameter layout makes the dense <-> UoE
converter trivial: SMHA keeps the dense attention's wq [D,H,K], wk/wv [D,G,K], wo [H,K,D] (heads are
already the expert axis) plus a gate `router` [D,H]; UoME stores the MLP's blocks stacked
w_gate/w_up [E,D,F/E], w_down [E,F/E,D] (logical axes expert, embed, mlp: sharded like the MoE
core) plus a gate `router` [D,E].

Both return `(y_BLD, aux)`: aux['loss'] the weighted Switch balance loss and z-loss of the gate
(f32), aux['metrics'] f32 scalars named `uoe/attn_...` and `uoe/mlp_...` (load per head/expert:
coefficient of variation, min, max; share of tokens no head/expert selected; share of token
choices dropped by the capacity; gate entropy; the two losses). With `entropy.enabled` each gate
also owns an `entropy_trigger.EntropyMonitor`: its loss joins aux['loss'], its metrics are
`uoe/attn_h_tok`, ... and its statistic goes to aux['stats'] for `update_state`; otherwise the
stats are empty (no state).
"""

import jax
import jax.numpy as jnp
from flax import nnx

from model import axes, capacity, entropy_trigger, smha, uoe
from model.attention import Attention
from model.config import ModelConfig
from model.layers import MLP, init_normal


def _monitor(cfg: ModelConfig) -> entropy_trigger.EntropyMonitor | None:
  return entropy_trigger.EntropyMonitor(cfg.entropy) if cfg.entropy.enabled else None


def _aux(
  cfg: ModelConfig, prefix: str, metrics: dict, monitor=None, probs_BLE=None, valid_BL=None
) -> dict:
  """Gate losses, `uoe/{prefix}_...` metrics and, with a monitor, the entropy trigger's share
  (over the valid tokens)."""
  u = cfg.uoe
  loss = u.balance_weight * metrics['balance_loss'] + u.z_loss_weight * metrics['z_loss']
  stats = {}
  if monitor is not None:
    entropy_loss, entropy_metrics, entropy_stats = monitor(
      probs_BLE.reshape(-1, probs_BLE.shape[-1]), None if valid_BL is None else valid_BL.reshape(-1)
    )
    loss, metrics = loss + entropy_loss, {**metrics, **entropy_metrics}
    stats = {entropy_trigger.STATS_KEY: entropy_stats}
  return {
    'loss': loss.astype(jnp.float32),
    'metrics': {f'uoe/{prefix}_{k}': v.astype(jnp.float32) for k, v in metrics.items()},
    'stats': stats,
  }


class _Gated(nnx.Module):
  """What both UoE layers share: the optional entropy monitor of their gate and its update."""

  def update_state(self, stats: dict) -> None:
    if self.entropy is not None:
      self.entropy.update_state(stats[entropy_trigger.STATS_KEY])


class SelectiveAttention(_Gated):
  """SMHA: dense attention's projections plus a gate over head-experts."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    self.dtype = jnp.dtype(cfg.dtype)
    d, h, g, k, pd = cfg.d_model, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.param_dtype
    self.router = axes.param(rngs, init_normal(cfg), (d, h), ('embed', None), pd)
    self.wq = axes.param(rngs, init_normal(cfg), (d, h, k), ('embed', 'heads', 'kv'), pd)
    self.wk = axes.param(rngs, init_normal(cfg), (d, g, k), ('embed', 'kv_heads', 'kv'), pd)
    self.wv = axes.param(rngs, init_normal(cfg), (d, g, k), ('embed', 'kv_heads', 'kv'), pd)
    self.wo = axes.param(
      rngs, init_normal(cfg, output=True), (h, k, d), ('heads', 'kv', 'embed'), pd
    )
    self.entropy = _monitor(cfg)

  @staticmethod
  def reads_future(cfg: ModelConfig) -> str | None:
    """Partial capacity: heads pick their top-C tokens of the sequence (None at full capacity)."""
    u = cfg.uoe
    if capacity.is_full(u.resolved_heads_per_token(cfg.num_heads), cfg.num_heads, u.head_capacity):
      return None  # every token that chose a head gets a slot: no competition
    return (
      'SMHA: each head takes its top-C tokens of the whole sequence '
      '(uoe.head_capacity * heads_per_token < num_heads)'
    )

  METRICS = 'uoe/attn_'  # prefix of the per-layer metrics it reports
  GATED = True  # a learned gate over heads: the entropy trigger monitors it

  @staticmethod
  def num_params(cfg: ModelConfig) -> int:
    """The dense attention's projections plus the gate D·H."""
    return Attention.num_params(cfg) + cfg.d_model * cfg.num_heads

  @staticmethod
  def _share(cfg: ModelConfig, seq_len: int) -> float:
    """C_h / S: the share of a sequence each head projects and attends."""
    return cfg.uoe.head_slots(seq_len, cfg.num_heads) / seq_len

  @classmethod
  def active_params(cls, cfg: ModelConfig, seq_len: int) -> float:
    """The gate, and the projections on the C_h tokens each head takes (C_h/S of the dense cost)."""
    projections = Attention.active_params(cfg, seq_len)
    return projections * cls._share(cfg, seq_len) + cfg.d_model * cfg.num_heads

  @classmethod
  def score_flops(cls, cfg: ModelConfig, seq_len: int) -> float:
    """Each head attends among its C_h tokens: (C_h/S)² of dense attention's score FLOPs."""
    return Attention.score_flops(cfg, seq_len) * cls._share(cfg, seq_len) ** 2

  @staticmethod
  def describe(cfg: ModelConfig) -> str:
    u = cfg.uoe
    return (
      f'SMHA: {u.resolved_heads_per_token(cfg.num_heads)} of {cfg.num_heads} heads per token, '
      f'head capacity {u.head_capacity}'
    )

  def __call__(
    self, x_BLD: jax.Array, positions_BL: jax.Array, segment_ids_BL: jax.Array | None = None
  ) -> tuple[jax.Array, dict]:
    cfg, u = self.cfg, self.cfg.uoe
    cast = lambda w: w[...].astype(self.dtype)
    y_BLD, g, sel = smha.smha(
      x_BLD.astype(self.dtype),
      self.router[...],
      cast(self.wq),
      cast(self.wk),
      cast(self.wv),
      cast(self.wo),
      positions_BL,
      heads_per_token=u.resolved_heads_per_token(cfg.num_heads),
      capacity_factor=u.head_capacity,
      gate_outputs=u.gate_outputs,
      rope_theta=cfg.rope_theta,
      segment_ids_BL=segment_ids_BL,
    )
    y_BLD = axes.constrain(y_BLD, axes.RESIDUAL)
    valid_BL = None if segment_ids_BL is None else segment_ids_BL != 0
    return y_BLD, _aux(
      cfg, 'attn', uoe.selection_metrics(g, sel, valid_BL), self.entropy, g.probs, valid_BL
    )


class UnionMLP(_Gated):
  """UoME: the dense SwiGLU MLP as E stacked column/row blocks plus a gate over them."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    self.dtype = jnp.dtype(cfg.dtype)
    e, d, pd = cfg.uoe.num_experts, cfg.d_model, cfg.param_dtype
    f = cfg.mlp_dim // e
    self.router = axes.param(rngs, init_normal(cfg), (d, e), ('embed', None), pd)
    self.w_gate = axes.param(rngs, init_normal(cfg), (e, d, f), ('expert', 'embed', 'mlp'), pd)
    self.w_up = axes.param(rngs, init_normal(cfg), (e, d, f), ('expert', 'embed', 'mlp'), pd)
    self.w_down = axes.param(
      rngs, init_normal(cfg, output=True), (e, f, d), ('expert', 'mlp', 'embed'), pd
    )
    self.entropy = _monitor(cfg)

  @staticmethod
  def reads_future(cfg: ModelConfig) -> str | None:
    """Data selection at partial capacity reads the sequence; expert selection reads a prefix mean."""
    u = cfg.uoe
    full = capacity.is_full(u.experts_per_token, u.num_experts, u.expert_capacity)
    if u.paradigm == 'expert_selection' or full:
      return None
    return (
      'UoME data selection: each expert takes its top-C tokens of the whole sequence '
      '(uoe.expert_capacity * experts_per_token < num_experts)'
    )

  METRICS = 'uoe/mlp_'  # prefix of the per-layer metrics it reports
  GATED = True  # a learned gate over experts: the entropy trigger monitors it

  @staticmethod
  def num_params(cfg: ModelConfig) -> int:
    """The dense MLP's weights (as E blocks) plus the gate D·E."""
    return MLP.num_params(cfg) + cfg.d_model * cfg.uoe.num_experts

  @staticmethod
  def active_params(cfg: ModelConfig, seq_len: int) -> float:
    """The gate, and each expert (F/E hidden units) on its C_e tokens of a sequence (data
    selection) or on the k of E experts of every token (expert selection)."""
    u = cfg.uoe
    if u.paradigm == 'expert_selection':
      share = u.experts_per_token / u.num_experts
    else:
      share = u.expert_slots(seq_len) / seq_len
    return MLP.num_params(cfg) * share + cfg.d_model * u.num_experts

  @staticmethod
  def describe(cfg: ModelConfig) -> str:
    u = cfg.uoe
    return (
      f'UoME: {u.experts_per_token} of {u.num_experts} experts per token ({u.paradigm}), '
      f'hidden {cfg.mlp_dim // u.num_experts} each'
    )

  def __call__(
    self, x_BLD: jax.Array, segment_ids_BL: jax.Array | None = None
  ) -> tuple[jax.Array, dict]:
    cfg, u = self.cfg, self.cfg.uoe
    x_BLD = x_BLD.astype(self.dtype)
    valid_BL = None if segment_ids_BL is None else segment_ids_BL != 0
    ws = [w[...].astype(self.dtype) for w in (self.w_gate, self.w_up, self.w_down)]
    if u.paradigm == 'expert_selection':
      y_BLD, g = uoe.uome_expert_selection(
        x_BLD,
        self.router[...],
        *ws,
        k=u.experts_per_token,
        gate_outputs=u.gate_outputs,
        impl=cfg.moe.gmm_impl,
        block_size=cfg.moe.block_size,
        segment_ids_BL=segment_ids_BL,
      )
      metrics = uoe.expert_selection_metrics(g, valid_BL)
    else:
      y_BLD, g, sel = uoe.uome(
        x_BLD,
        self.router[...],
        *ws,
        k=u.experts_per_token,
        capacity_factor=u.expert_capacity,
        gate_outputs=u.gate_outputs,
        valid_BL=valid_BL,
      )
      metrics = uoe.selection_metrics(g, sel, valid_BL)
    return axes.constrain(y_BLD, axes.RESIDUAL), _aux(
      cfg, 'mlp', metrics, self.entropy, g.probs, valid_BL
    )
