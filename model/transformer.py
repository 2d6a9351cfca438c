"""Decoder-only transformer: embedding, stages of layers (scanned or looped), final norm, head.

`Transformer(cfg, rngs=...)(tokens_BL) -> (logits_BLV, aux)`: logits are f32 whatever the compute
dtype; aux is {'loss': f32 scalar summed over layers, 'metrics': {'layer_{i}/name': scalar},
'stats': per-stage statistics for `update_state`}.

Consecutive layers with the same `LayerSpec` form one `Stage` (one scan). A dense model is one
stage; routed layers in some positions split it.

Causality is declared, not listed: every layer kind answers `reads_future(cfg)` (why its output at
t can depend on tokens after t, or None), and `future_dependence(cfg)` gathers the answers of the
layers a config builds; `Transformer.causal` is True when there are none. Segment id 0 marks tokens
that are not there (`model.validity`), which is how a non-causal model is run on an exact prefix.

Under raw jax transforms (jax.jit, jax.grad, ...) merge the model inside the transformed function:
nnx.scan refuses Variables created at an outer trace level. nnx.jit / nnx.grad need nothing special.
"""

import itertools

import jax
import jax.numpy as jnp
from flax import nnx

from model import (
  axes,
  entropy_trigger,
  moe_layer,  # noqa: F401  (registers block.FEED_FORWARD['moe'])
  uoe_layer,  # noqa: F401  (registers block.ATTENTION['smha'], FEED_FORWARD['uome'])
)
from model.block import ATTENTION, FEED_FORWARD, RESIDUAL, layer_specs
from model.config import ModelConfig
from model.layers import Embedding, RMSNorm, init_normal
from model.stage import Stage


class Transformer(nnx.Module):
  """The dense decoder-only language model."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    self.embed = Embedding(cfg, rngs=rngs)
    stages, first = [], 0
    for spec, run in itertools.groupby(layer_specs(cfg)):
      count = len(list(run))
      stages.append(Stage(cfg, spec, first, count, rngs=rngs))
      first += count
    self.stages = nnx.List(stages)
    self.final_norm = RMSNorm(cfg, rngs=rngs)
    if not cfg.tie_embeddings:
      self.head = axes.param(
        rngs, init_normal(cfg), (cfg.d_model, cfg.vocab_size), ('embed', 'vocab'), cfg.param_dtype
      )

  @property
  def causal(self) -> bool:
    """Whether the logits at t depend on tokens <= t only (derived from the layer kinds)."""
    return is_causal(self.cfg)

  def __call__(
    self,
    tokens_BL: jax.Array,
    *,
    positions_BL: jax.Array | None = None,
    segment_ids_BL: jax.Array | None = None,
  ) -> tuple[jax.Array, dict]:
    """Logits [B, L, V] in f32 and the aux dict; positions default to 0..L-1 in every row."""
    return self.from_embeddings(
      self.embed(tokens_BL), positions_BL=positions_BL, segment_ids_BL=segment_ids_BL
    )

  def from_embeddings(
    self,
    x_BLD: jax.Array,
    *,
    positions_BL: jax.Array | None = None,
    segment_ids_BL: jax.Array | None = None,
  ) -> tuple[jax.Array, dict]:
    """Everything after the token lookup; a float entry point (gradients w.r.t. the input)."""
    b, l = x_BLD.shape[:2]
    if positions_BL is None:
      positions_BL = jnp.broadcast_to(jnp.arange(l, dtype=jnp.int32), (b, l))
    x_BLD = axes.constrain(x_BLD.astype(self.cfg.dtype), RESIDUAL)
    loss, metrics, stats = jnp.zeros((), jnp.float32), {}, []
    for stage in self.stages:
      x_BLD, aux = stage(x_BLD, positions_BL, segment_ids_BL)
      loss, metrics = loss + aux['loss'], {**metrics, **aux['metrics']}
      stats.append(aux['stats'])
    aux = {'loss': loss, 'metrics': metrics, 'stats': stats}
    x_BLD = self.final_norm(x_BLD)
    if self.cfg.tie_embeddings:
      logits_BLV = self.embed.attend(x_BLD)
    else:
      logits_BLV = jnp.einsum(
        'bld,dv->blv',
        x_BLD,
        self.head[...].astype(self.cfg.dtype),
        preferred_element_type=jnp.float32,
      )
    logits_BLV = axes.constrain(logits_BLV.astype(jnp.float32), ('batch', 'length', 'act_vocab'))
    return logits_BLV, aux

  def update_state(self, stats: list) -> None:
    """Updates every routed layer's non-gradient state from the forward pass's `aux['stats']`.

    With `entropy.mode='global'` every entropy monitor first gets the mean H_tok over all
    monitored layers, so all layers trigger together (see `entropy_trigger.share_across_layers`).
    """
    if self.cfg.entropy.enabled and self.cfg.entropy.mode == 'global':
      stats = entropy_trigger.share_across_layers(stats)
    for stage, stage_stats in zip(self.stages, stats):
      stage.update_state(stage_stats)

  def layer_stats(self, stats: list) -> dict[int, dict]:
    """`aux['stats']` as {layer index: that layer's stats} (layers without stats left out)."""
    out = {}
    for stage, stage_stats in zip(self.stages, stats):
      out.update(stage.layer_stats(stage_stats))
    return out


def future_dependence(cfg: ModelConfig) -> list[str]:
  """Why the model's logits at t can depend on tokens after t: the distinct reasons its layer
  kinds declare (`reads_future`), in layer order; empty for a causal model."""
  reasons = []
  for spec in layer_specs(cfg):
    for kind in (ATTENTION[spec.attention], FEED_FORWARD[spec.feed_forward]):
      if not hasattr(kind, 'reads_future'):
        raise TypeError(
          f'layer kind {kind.__name__} does not declare reads_future(cfg) (see model/block.py)'
        )
      reason = kind.reads_future(cfg)
      if reason and reason not in reasons:
        reasons.append(reason)
  return reasons


def is_causal(cfg: ModelConfig) -> bool:
  """True when no layer's output at t can depend on tokens after t (evaluation mode)."""
  return not future_dependence(cfg)


def count_params(cfg: ModelConfig) -> int:
  """Exact number of learned parameters (nnx.Param), from an abstract (eval_shape) model."""
  abstract = nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0)))
  leaves = jax.tree.leaves(nnx.state(abstract, nnx.Param))
  return int(sum(leaf.size for leaf in leaves))


def matmul_params(cfg: ModelConfig) -> int:
  """Weights that take part in a matmul per token: attention and MLP projections (in MoE layers
  the router and the top_k + shared active experts; expert choice counted as top_k too), and the
  output head (D*V, tied or not); norms and the embedding lookup are excluded."""
  d = cfg.d_model
  mlp = 3 * d * cfg.mlp_dim
  m = cfg.moe
  f = m.hidden(cfg.mlp_dim)
  routed = d * m.num_experts + 3 * d * f * (m.top_k + m.shared_experts)  # router + active experts
  num_moe = sum(m.is_moe_layer(i) for i in range(cfg.num_layers))
  routing = cfg.attention.routing_layers_resolved(cfg.num_layers)
  attn = len(routing) * _routing_attention_params(cfg) + (
    cfg.num_layers - len(routing)
  ) * _attention_params(cfg)
  return attn + (cfg.num_layers - num_moe) * mlp + num_moe * routed + d * cfg.vocab_size


def _attention_params(cfg: ModelConfig) -> int:
  """Q and output projections (D×H×K each) plus K and V (D×G×K each) of one layer."""
  return 2 * cfg.d_model * cfg.head_dim * (cfg.num_heads + cfg.num_kv_heads)


def _routing_attention_params(cfg: ModelConfig) -> int:
  """A routing-attention layer (model/routing_layer.py): Q and output projections of all H heads,
  V of the R routing heads (their keys are their queries), K and V of the G_local local kv heads."""
  h, k = cfg.num_heads, cfg.head_dim
  r = cfg.attention.resolved_routing_heads(h)
  g = cfg.num_kv_heads * (h - r) // h
  return cfg.d_model * k * (2 * h + r + 2 * g)


def flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
  """Training FLOPs per token, the PaLM (Chowdhery et al. 2022, App. B) MFU accounting.

  6 * N + 12 * L * D * S: each matmul weight costs 2 FLOPs forward and 4 backward per token (N =
  `matmul_params`), and attention scores plus the weighted sum cost 2 * 2 * D * S forward per layer,
  times 3 for backward. Causal masking is not discounted (the standard convention), and
  rematerialised recomputation is not counted (MFU, not HFU). UoE layers count the work their
  token selection keeps (`_uoe_savings`).
  """
  dense = 6.0 * matmul_params(cfg) + 12.0 * cfg.num_layers * cfg.d_model * seq_len
  return dense - _uoe_savings(cfg, seq_len)


def active_params(cfg: ModelConfig, seq_len: int) -> float:
  """Matmul weights per token on average (`matmul_params`, less what UoE's token selection skips):
  the "active parameters" at which methods are compared."""
  return matmul_params(cfg) - _uoe_selection(cfg, seq_len)[0]


def _uoe_savings(cfg: ModelConfig, seq_len: int) -> float:
  """FLOPs per token that UoE layers do not spend, relative to the dense count above."""
  params, score_flops = _uoe_selection(cfg, seq_len)
  return 6.0 * params + score_flops


def _uoe_selection(cfg: ModelConfig, seq_len: int) -> tuple[float, float]:
  """(matmul weights per token, attention-score training FLOPs per token) that UoE layers skip.

  An SMHA head projects and attends only its C_h = `uoe.head_slots` tokens of each sequence:
  projections at C_h/L of the dense cost, scores at (C_h/L)²; a UoME expert (F/E hidden units)
  runs on its C_e = `uoe.expert_slots` tokens (data selection) or on the k of E experts of every
  position (expert selection). The gates (D×H, D×E) are added.
  """
  u, n, d, s = cfg.uoe, cfg.num_layers, cfg.d_model, seq_len
  attn = _attention_params(cfg)
  head_share = u.head_slots(s, cfg.num_heads) / s
  if u.paradigm == 'expert_selection':
    mlp_share = u.experts_per_token / u.num_experts
  else:
    mlp_share = u.expert_slots(s) / s
  params = scores = 0.0
  for i in range(n):
    if u.is_smha_layer(i, n):
      params += attn * (1 - head_share) - d * cfg.num_heads
      scores += 12.0 * d * s * (1 - head_share**2)
    if u.is_uome_layer(i, n):
      params += 3 * d * cfg.mlp_dim * (1 - mlp_share) - d * u.num_experts
  return params, scores
