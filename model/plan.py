"""The layer plan: one function from a model config to what every layer is, costs and reports.

`build(cfg, seq_len)` reads the placement (`ModelConfig.layer_specs`) and asks each layer's kinds
(`model.registry`) what they declare; nothing else in the codebase recomputes any of it. Model
construction groups the plan's specs into stages; parameter and FLOP counts (MFU), causality
(which decides teacher-forced or exact-prefix evaluation and sampling, and refuses packing), the
routing report, the memory estimate, the benchmarks and export read the plan.

FLOPs follow the PaLM accounting (Chowdhery et al. 2022, App. B): each matmul weight costs 6 FLOPs
per token in training (2 forward, 4 backward), attention scores and the weighted sum
`score_flops` as each attention kind declares (the keys its kernel scores; a causal mask is not
discounted); rematerialised recomputation is not counted (MFU, not HFU). See docs/design.md.
"""

import dataclasses
import itertools

import jax
import jax.numpy as jnp

from model import registry
from model.config import ConfigError, LayerSpec, ModelConfig


@dataclasses.dataclass(frozen=True)
class LayerPlan:
  """One layer: its kinds, what it reads, costs and reports. Per-token figures need a seq_len
  (selection and cluster sizes depend on it) and are None in a plan built without one."""

  index: int
  spec: LayerSpec
  description: str  # the attention's and the feed-forward's one-line descriptions, joined
  reads_future: tuple[str, ...]  # why its output at t can depend on tokens after t; () = causal
  params: int  # learned parameters, the two RMSNorm scales included
  active_params: float | None  # matmul weights per token
  score_flops: float | None  # attention scores and weighted sum, training FLOPs per token
  metrics: tuple[str, ...]  # prefixes of the per-layer metrics it reports (`layer_{i}/...`)
  gated: bool  # has a learned router the entropy trigger monitors

  @property
  def causal(self) -> bool:
    return not self.reads_future

  @property
  def flops_per_token(self) -> float:
    """Training FLOPs per token of this layer: 6 per active matmul weight plus its scores."""
    _need_seq_len(self.active_params)
    return 6.0 * self.active_params + self.score_flops


@dataclasses.dataclass(frozen=True)
class ModelPlan:
  """Every layer's plan and the model-level counts: embedding, final norm and output head."""

  layers: tuple[LayerPlan, ...]
  seq_len: int | None
  embed_params: int  # the token table V·D
  head_params: int  # 0 when tied to the embedding, else D·V
  head_active_params: int  # D·V per token, tied or not
  final_norm_params: int

  @property
  def specs(self) -> tuple[LayerSpec, ...]:
    return tuple(layer.spec for layer in self.layers)

  @property
  def params(self) -> int:
    """Learned parameters (nnx.Param) of the model the config builds."""
    layers = sum(layer.params for layer in self.layers)
    return self.embed_params + layers + self.final_norm_params + self.head_params

  @property
  def reasons(self) -> list[str]:
    """The distinct reasons the logits at t can depend on tokens after t, in layer order."""
    out = []
    for layer in self.layers:
      out += [r for r in layer.reads_future if r not in out]
    return out

  @property
  def causal(self) -> bool:
    """Whether the logits at t depend on tokens <= t only."""
    return not self.reasons

  @property
  def gated_layers(self) -> list[int]:
    """Layers with a learned router (MoE, SMHA, UoME): what the entropy trigger monitors."""
    return [layer.index for layer in self.layers if layer.gated]

  @property
  def active_params(self) -> float:
    """Matmul weights per token, the output head included: the "active parameters" at which
    methods are compared (norms and the embedding lookup excluded)."""
    _need_seq_len(self.seq_len)
    return sum(layer.active_params for layer in self.layers) + self.head_active_params

  @property
  def flops_per_token(self) -> float:
    """Training FLOPs per token (the MFU numerator): every layer's plus the head's 6·D·V."""
    _need_seq_len(self.seq_len)
    layers = sum(layer.flops_per_token for layer in self.layers)
    return layers + 6.0 * self.head_active_params


def _need_seq_len(value) -> None:
  if value is None:
    raise ValueError('per-token counts need a sequence length: plan.build(cfg, seq_len)')


def _layer(cfg: ModelConfig, index: int, spec: LayerSpec, seq_len: int | None) -> LayerPlan:
  attention = registry.lookup('attention kind', spec.attention, f'layer {index} attention')
  feed_forward = registry.lookup(
    'feed-forward kind', spec.feed_forward, f'layer {index} feed_forward'
  )
  kinds = (attention, feed_forward)
  reasons = tuple(r for r in (kind.reads_future(cfg) for kind in kinds) if r)
  per_token = seq_len is not None
  return LayerPlan(
    index=index,
    spec=spec,
    description=f'{attention.describe(cfg)}; {feed_forward.describe(cfg)}',
    reads_future=reasons,
    params=sum(kind.num_params(cfg) for kind in kinds) + 2 * cfg.d_model,
    active_params=sum(k.active_params(cfg, seq_len) for k in kinds) if per_token else None,
    score_flops=attention.score_flops(cfg, seq_len) if per_token else None,
    metrics=tuple(kind.METRICS for kind in kinds if kind.METRICS),
    gated=any(kind.GATED for kind in kinds),
  )


def build(cfg: ModelConfig, seq_len: int | None = None) -> ModelPlan:
  """The plan of the model `cfg` builds; per-token counts for sequences of `seq_len` tokens.

  Raises a one-line ConfigError for a kind the registry does not know, a router it does not
  know, or entropy-triggered routing in a model without a learned router.
  """
  if cfg.moe.num_experts:
    registry.lookup('router', cfg.moe.router, 'moe.router')
  layers = tuple(_layer(cfg, i, spec, seq_len) for i, spec in enumerate(cfg.layer_specs()))
  plan = ModelPlan(
    layers=layers,
    seq_len=seq_len,
    embed_params=cfg.vocab_size * cfg.d_model,
    head_params=0 if cfg.tie_embeddings else cfg.d_model * cfg.vocab_size,
    head_active_params=cfg.d_model * cfg.vocab_size,
    final_norm_params=cfg.d_model,
  )
  if cfg.entropy.enabled and not plan.gated_layers:
    raise ConfigError(
      'entropy.enabled=True: the model has no routed layer to monitor '
      f'(moe.num_experts={cfg.moe.num_experts}, moe.every={cfg.moe.every}, '
      f'uoe.attention={cfg.uoe.attention!r}, uoe.feed_forward={cfg.uoe.feed_forward!r})'
    )
  return plan


def layer_states(state: dict, cfg: ModelConfig) -> list[dict]:
  """The per-layer block trees of a Transformer's pure-dict state (`nnx.to_pure_dict`), in layer
  order: the stages' stacked (scanned) or listed blocks taken apart."""
  layers = []
  for s, (_, run) in enumerate(itertools.groupby(cfg.layer_specs())):
    blocks = state['stages'][s]['blocks']
    for j in range(len(list(run))):
      layers.append(jax.tree.map(lambda a, j=j: a[j], blocks) if cfg.scan_layers else blocks[j])
  return layers


def stage_states(layers: list[dict], cfg: ModelConfig) -> dict:
  """The inverse of `layer_states`: per-layer trees grouped into the stages of `cfg` (stacked when
  layers are scanned), the `stages` entry of a pure-dict state."""
  stages, first = {}, 0
  for s, (_, run) in enumerate(itertools.groupby(cfg.layer_specs())):
    group = layers[first : first + len(list(run))]
    first += len(group)
    stages[s] = {
      'blocks': (
        jax.tree.map(lambda *a: jnp.stack(a), *group) if cfg.scan_layers else dict(enumerate(group))
      )
    }
  return stages
