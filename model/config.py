"""Frozen, validated configuration of the model: what model code reads instead of a ConfigDict."""

import dataclasses
import math

from model.capacity import capacity

REMAT_POLICIES = ('none', 'full', 'save_dots', 'save_dots_no_batch')
ATTENTION_IMPLS = ('auto', 'xla', 'chunked', 'cudnn', 'splash')  # model.flash.IMPLS
DTYPES = ('float32', 'bfloat16', 'float16')


class ConfigError(ValueError):
  """A configuration value is wrong; the message names the field and what was expected."""


def check_finite(group: str, obj) -> None:
  """Refuses a nan or infinite float field of the dataclass `obj` (range checks such as `x < 0`
  are False for nan, so they alone would let it through)."""
  for f in dataclasses.fields(obj):
    value = getattr(obj, f.name)
    if isinstance(value, float) and not math.isfinite(value):
      raise ConfigError(f'{group}.{f.name}={value}: expected a finite number')


ATTENTION_KINDS = ('dense', 'routing')
NON_ROUTING_KINDS = ('dense', 'local')
ROUTING_SCALES = ('rsqrt_dim', 'none')


@dataclasses.dataclass(frozen=True)
class AttentionConfig:
  impl: str = 'auto'
  kind: str = 'dense'
  non_routing: str = 'dense'
  routing_layers: tuple[int, ...] = (-2, -1)
  window: int = 256
  local_window: int = 256
  num_clusters: int = 0
  routing_heads: int = -1
  commitment_weight: float = 1e-4
  kmeans_decay: float = 0.999
  routing_scale: str = 'rsqrt_dim'
  qk_norm: bool = False

  def routing_layers_resolved(self, num_layers: int) -> frozenset[int]:
    """Indices of the layers with routing heads (none unless kind == 'routing')."""
    if self.kind != 'routing':
      return frozenset()
    return frozenset(i % num_layers for i in self.routing_layers)

  def validate(self, num_layers: int) -> None:
    if self.impl not in ATTENTION_IMPLS:
      raise ConfigError(f'attention.impl={self.impl!r}: expected one of {ATTENTION_IMPLS}')
    if self.kind not in ATTENTION_KINDS:
      raise ConfigError(f'attention.kind={self.kind!r}: expected one of {ATTENTION_KINDS}')
    if self.routing_scale not in ROUTING_SCALES:
      raise ConfigError(
        f'attention.routing_scale={self.routing_scale!r}: expected one of {ROUTING_SCALES}'
      )
    if self.non_routing not in NON_ROUTING_KINDS:
      raise ConfigError(
        f'attention.non_routing={self.non_routing!r}: expected one of {NON_ROUTING_KINDS}'
      )
    for i in self.routing_layers:
      if not -num_layers <= i < num_layers:
        raise ConfigError(
          f'attention.routing_layers={self.routing_layers}: layer {i} is outside '
          f'a model of model.num_layers={num_layers}'
        )
    for name in ('window', 'local_window'):
      if getattr(self, name) < 1:
        raise ConfigError(f'attention.{name}={getattr(self, name)}: expected a positive integer')
    if self.qk_norm and self.kind != 'dense':
      raise ConfigError(
        f'attention.qk_norm=True: implemented for dense attention only (attention.kind={self.kind!r})'
      )
    if self.num_clusters < 0:
      raise ConfigError(f'attention.num_clusters={self.num_clusters}: expected >= 0 (0 = derived)')
    if self.commitment_weight < 0:
      raise ConfigError(f'attention.commitment_weight={self.commitment_weight}: expected >= 0')
    if not 0 < self.kmeans_decay < 1:
      raise ConfigError(f'attention.kmeans_decay={self.kmeans_decay}: expected a value in (0, 1)')

  def resolved_routing_heads(self, num_heads: int) -> int:
    """Routing heads of a routing layer: `routing_heads`, or half the heads when it is -1."""
    return num_heads // 2 if self.routing_heads == -1 else self.routing_heads

  def validate_heads(self, num_heads: int, num_kv_heads: int) -> None:
    if self.kind != 'routing':
      return
    r = self.resolved_routing_heads(num_heads)
    if not 1 <= r <= num_heads:
      raise ConfigError(
        f'attention.routing_heads={self.routing_heads}: expected -1 (half) or '
        f'1..model.num_heads={num_heads}'
      )
    if (num_heads - r) % (num_heads // num_kv_heads):
      raise ConfigError(
        f'attention.routing_heads={r}: the {num_heads - r} local heads must be a '
        f'multiple of the GQA group size {num_heads // num_kv_heads}'
      )


MOE_SCORES = ('softmax', 'sigmoid')
MOE_EXECUTIONS = ('dropless', 'capacity')
# model/gmm.py
MOE_GMM_IMPLS = ('auto', 'scan', 'blas', 'ragged_dot', 'tokamax', 'megablox', 'mgpu')
MOE_BALANCE_CONVENTIONS = ('assignments', 'tokens')


@dataclasses.dataclass(frozen=True)
class MoEConfig:
  num_experts: int = 0
  every: int = 1
  top_k: int = 2
  router: str = 'topk'
  score: str = 'softmax'
  renormalize: bool = True
  expert_dim: int = 0
  shared_experts: int = 0
  execution: str = 'dropless'
  gmm_impl: str = 'auto'
  block_size: int = 0
  capacity_factor: float = 1.25
  balance_weight: float = 1e-2
  balance_convention: str = 'assignments'
  z_loss_weight: float = 1e-3
  bias_rate: float = 0.0
  jitter: float = 0.0
  erc_weight: float = 0.0
  erc_alpha: float = 1.0
  erc_grad_to_router: bool = False

  def is_moe_layer(self, layer: int) -> bool:
    """MoE feed-forward in every `every`-th layer (the last of each group), dense between."""
    return self.num_experts > 0 and layer % self.every == self.every - 1

  def hidden(self, mlp_dim: int) -> int:
    """Hidden width of one expert (`expert_dim`, or the dense model's `mlp_dim` when 0)."""
    return self.expert_dim or mlp_dim

  def validate(self) -> None:
    if self.every < 1:
      raise ConfigError(f'moe.every={self.every}: expected >= 1')
    if self.num_experts < 0:
      raise ConfigError(f'moe.num_experts={self.num_experts}: expected >= 0')
    for name, allowed in (
      ('score', MOE_SCORES),
      ('execution', MOE_EXECUTIONS),
      ('gmm_impl', MOE_GMM_IMPLS),
      ('balance_convention', MOE_BALANCE_CONVENTIONS),
    ):
      if getattr(self, name) not in allowed:
        raise ConfigError(f'moe.{name}={getattr(self, name)!r}: expected one of {allowed}')
    if self.num_experts and not 1 <= self.top_k <= self.num_experts:
      raise ConfigError(
        f'moe.top_k={self.top_k}: expected 1 <= top_k <= moe.num_experts={self.num_experts}'
      )
    if self.capacity_factor <= 0:
      raise ConfigError(f'moe.capacity_factor={self.capacity_factor}: expected > 0')
    for name in (
      'expert_dim',
      'shared_experts',
      'balance_weight',
      'z_loss_weight',
      'bias_rate',
      'jitter',
      'erc_weight',
      'erc_alpha',
    ):
      if getattr(self, name) < 0:
        raise ConfigError(f'moe.{name}={getattr(self, name)}: expected >= 0')
    if self.erc_weight > 0 and self.num_experts == 0:
      raise ConfigError(
        f'moe.erc_weight={self.erc_weight}: the ERC loss needs MoE layers (moe.num_experts > 0)'
      )
    if self.block_size < 0:
      raise ConfigError(f'moe.block_size={self.block_size}: expected >= 0 (0: auto)')
    if self.router == 'expert_choice' and self.score != 'softmax':
      raise ConfigError(f'moe.score={self.score!r}: expert_choice routing uses softmax scores')


ENTROPY_MODES = ('per_layer', 'global')


@dataclasses.dataclass(frozen=True)
class EntropyConfig:
  """Entropy-triggered routing (docs/moe.md); `model.entropy_trigger` implements it."""

  enabled: bool = False
  tau: float = 0.7
  plateau: float = 1e-3
  plateau_window: int = 1000
  ema_decay: float = 0.99
  ramp_steps: int = 300
  beta_tok: float = 1e-3
  beta_use: float = 1e-2
  mode: str = 'per_layer'

  def validate(self) -> None:
    if not 0 < self.tau < 1:
      raise ConfigError(f'entropy.tau={self.tau}: expected a value in (0, 1) (normalised entropy)')
    if not 0 <= self.ema_decay < 1:
      raise ConfigError(f'entropy.ema_decay={self.ema_decay}: expected a value in [0, 1)')
    for name in ('plateau', 'beta_tok', 'beta_use'):
      if getattr(self, name) < 0:
        raise ConfigError(f'entropy.{name}={getattr(self, name)}: expected >= 0')
    for name in ('plateau_window', 'ramp_steps'):
      if getattr(self, name) < 1:
        raise ConfigError(f'entropy.{name}={getattr(self, name)}: expected >= 1 step')
    if self.mode not in ENTROPY_MODES:
      raise ConfigError(f'entropy.mode={self.mode!r}: expected one of {ENTROPY_MODES}')


UOE_ATTENTIONS = ('dense', 'smha')
UOE_FEED_FORWARDS = ('mlp', 'uome')
UOE_PARADIGMS = ('data_selection', 'expert_selection')


@dataclasses.dataclass(frozen=True)
class UoEConfig:
  """Union of Experts (docs/uoe.md): SMHA attention and UoME feed-forward layers."""

  attention: str = 'dense'
  feed_forward: str = 'mlp'
  layers: tuple[int, ...] = ()
  heads_per_token: int = -1
  head_capacity: float = 1.0
  num_experts: int = 4
  experts_per_token: int = 2
  expert_capacity: float = 1.0
  paradigm: str = 'data_selection'
  gate_outputs: bool = True
  balance_weight: float = 1e-2
  z_loss_weight: float = 1e-3

  def _in_layers(self, layer: int, num_layers: int) -> bool:
    return not self.layers or layer in {i % num_layers for i in self.layers}

  def is_smha_layer(self, layer: int, num_layers: int) -> bool:
    return self.attention == 'smha' and self._in_layers(layer, num_layers)

  def is_uome_layer(self, layer: int, num_layers: int) -> bool:
    return self.feed_forward == 'uome' and self._in_layers(layer, num_layers)

  def resolved_heads_per_token(self, num_heads: int) -> int:
    """Head-experts each token picks: `heads_per_token`, or half the heads when it is -1."""
    return max(1, num_heads // 2) if self.heads_per_token == -1 else self.heads_per_token

  def head_slots(self, seq_len: int, num_heads: int) -> int:
    """Tokens each head takes per sequence (`model.capacity`, factor head_capacity)."""
    k = self.resolved_heads_per_token(num_heads)
    return capacity(seq_len, k, num_heads, self.head_capacity)

  def expert_slots(self, seq_len: int) -> int:
    """Tokens each MLP expert takes per sequence in data selection (`model.capacity`)."""
    return capacity(seq_len, self.experts_per_token, self.num_experts, self.expert_capacity)

  def validate(self, num_layers: int, num_heads: int, mlp_dim: int) -> None:
    for name, allowed in (
      ('attention', UOE_ATTENTIONS),
      ('feed_forward', UOE_FEED_FORWARDS),
      ('paradigm', UOE_PARADIGMS),
    ):
      if getattr(self, name) not in allowed:
        raise ConfigError(f'uoe.{name}={getattr(self, name)!r}: expected one of {allowed}')
    for i in self.layers:
      if not -num_layers <= i < num_layers:
        raise ConfigError(
          f'uoe.layers={self.layers}: layer {i} is outside a model of model.num_layers={num_layers}'
        )
    h = self.resolved_heads_per_token(num_heads)
    if not 1 <= h <= num_heads:
      raise ConfigError(
        f'uoe.heads_per_token={self.heads_per_token}: expected -1 (half) or '
        f'1..model.num_heads={num_heads}'
      )
    if self.num_experts < 1:
      raise ConfigError(f'uoe.num_experts={self.num_experts}: expected a positive integer')
    if not 1 <= self.experts_per_token <= self.num_experts:
      raise ConfigError(
        f'uoe.experts_per_token={self.experts_per_token}: expected 1..'
        f'uoe.num_experts={self.num_experts}'
      )
    if self.feed_forward == 'uome' and mlp_dim % self.num_experts:
      raise ConfigError(
        f'uoe.num_experts={self.num_experts} must divide model.mlp_dim={mlp_dim} '
        '(each expert is a column/row block of the dense MLP)'
      )
    for name in ('head_capacity', 'expert_capacity'):
      if getattr(self, name) <= 0:
        raise ConfigError(f'uoe.{name}={getattr(self, name)}: expected > 0')
    for name in ('balance_weight', 'z_loss_weight'):
      if getattr(self, name) < 0:
        raise ConfigError(f'uoe.{name}={getattr(self, name)}: expected >= 0')


@dataclasses.dataclass(frozen=True)
class LayerSpec:
  """The kinds one layer is made of (names in `model.registry`); consecutive layers with equal
  specs are scanned together."""

  attention: str = 'dense'
  feed_forward: str = 'mlp'


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  vocab_size: int = 384
  num_layers: int = 12
  d_model: int = 768
  num_heads: int = 12
  num_kv_heads: int = 12
  mlp_dim: int = 2048
  tie_embeddings: bool = True
  rope_theta: float = 10000.0
  norm_eps: float = 1e-6
  init_std: float = 0.02
  dtype: str = 'bfloat16'
  param_dtype: str = 'float32'
  scan_layers: bool = True
  remat: str = 'none'
  attention: AttentionConfig = AttentionConfig()
  moe: MoEConfig = MoEConfig()
  entropy: EntropyConfig = EntropyConfig()
  uoe: UoEConfig = UoEConfig()

  @property
  def head_dim(self) -> int:
    return self.d_model // self.num_heads

  def layer_specs(self) -> tuple[LayerSpec, ...]:
    """The kinds of every layer: where each config group puts its layers (docs/design.md, the
    layer plan). The one place placement is decided; `model.plan.build` adds what each layer costs
    and reports. A layer two groups claim is a ConfigError naming both fields."""
    n, a, u = self.num_layers, self.attention, self.uoe
    routing = a.routing_layers_resolved(n)
    specs = []
    for i in range(n):
      # kind='routing', non_routing='local' (the paper's layout): only local heads between them
      local = a.kind == 'routing' and a.non_routing == 'local'
      attention = 'routing' if i in routing else 'local' if local else 'dense'
      feed_forward = 'moe' if self.moe.is_moe_layer(i) else 'mlp'
      if u.is_smha_layer(i, n):  # Union of Experts: uoe.layers (() = every layer)
        if i in routing:
          raise ConfigError(
            f'uoe.attention=smha: layer {i} already has routing attention '
            '(attention.kind=routing); restrict uoe.layers or attention.routing_layers'
          )
        attention = 'smha'
      if u.is_uome_layer(i, n):
        if feed_forward == 'moe':
          raise ConfigError(
            f'uoe.feed_forward=uome: layer {i} is already an MoE layer '
            '(moe.num_experts > 0); restrict uoe.layers or moe.every'
          )
        feed_forward = 'uome'
      specs.append(LayerSpec(attention, feed_forward))
    return tuple(specs)

  def validate(self) -> None:
    check_finite('model', self)
    for group in ('attention', 'moe', 'entropy', 'uoe'):
      check_finite(group, getattr(self, group))
    for name in ('vocab_size', 'num_layers', 'd_model', 'num_heads', 'num_kv_heads', 'mlp_dim'):
      if getattr(self, name) <= 0:
        raise ConfigError(f'model.{name}={getattr(self, name)}: expected a positive integer')
    if self.d_model % self.num_heads:
      raise ConfigError(
        f'model.num_heads={self.num_heads} must divide model.d_model={self.d_model}'
      )
    if self.head_dim % 2:
      raise ConfigError(
        f'model.d_model/model.num_heads={self.head_dim}: RoPE needs an even head dimension'
      )
    if self.num_heads % self.num_kv_heads:
      raise ConfigError(
        f'model.num_kv_heads={self.num_kv_heads} must divide model.num_heads={self.num_heads}'
      )
    if self.remat not in REMAT_POLICIES:
      raise ConfigError(f'model.remat={self.remat!r}: expected one of {REMAT_POLICIES}')
    for name in ('dtype', 'param_dtype'):
      if getattr(self, name) not in DTYPES:
        raise ConfigError(f'model.{name}={getattr(self, name)!r}: expected one of {DTYPES}')
    for name in ('init_std', 'norm_eps', 'rope_theta'):
      if getattr(self, name) <= 0:
        raise ConfigError(f'model.{name}={getattr(self, name)}: expected a positive value')
    self.attention.validate(self.num_layers)
    self.attention.validate_heads(self.num_heads, self.num_kv_heads)
    self.moe.validate()
    self.entropy.validate()
    self.uoe.validate(self.num_layers, self.num_heads, self.mlp_dim)
    if self.attention.qk_norm and self.uoe.attention != 'dense':
      raise ConfigError('attention.qk_norm=True: not implemented for uoe.attention=smha')
    specs = self.layer_specs()
    if self.moe.erc_weight > 0 and not any(s.feed_forward == 'moe' for s in specs):
      raise ConfigError(
        f'moe.erc_weight={self.moe.erc_weight}: no MoE layer in '
        f'model.num_layers={self.num_layers} with moe.every={self.moe.every}'
      )
