"""Pre-norm transformer block and the protocol its sublayers follow.

Attention sublayers are called as `(x_BLD, positions_BL, segment_ids_BL)`, feed-forward ones as
`(x_BLD, segment_ids_BL)`: segment ids keep packed documents apart and id 0 marks tokens that are
not there (`model.validity`). Every kind declares `reads_future(cfg) -> str | None` (a static
method: why its output at t can depend on tokens after t, or None), from which the model's
causality is derived (`model.transformer.future_dependence`).
A sublayer returns either an array (dense) or `(y, aux)` (routed), where aux is
`{'loss': f32 scalar of weighted aux losses, 'metrics': {name: scalar}, 'stats': pytree}`.
`stats` feed `update_state(stats)`, which the train step calls after the gradient to update the
layer's non-gradient `axes.RoutingState` (never during rematerialisation). Which attention and
feed-forward a layer gets is its `LayerSpec`; new kinds register in `ATTENTION` / `FEED_FORWARD`.
"""

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from model import axes
from model.attention import Attention
from model.config import ModelConfig
from model.layers import MLP, RMSNorm
from model.local_layer import LocalAttention
from model.routing_layer import RoutingAttention

RESIDUAL = ('batch', 'length', 'act_embed')

# kind name -> constructor(cfg, *, rngs); routed kinds are added by their modules' registration.
ATTENTION = {'dense': Attention, 'local': LocalAttention, 'routing': RoutingAttention}
FEED_FORWARD = {'mlp': MLP}


@dataclasses.dataclass(frozen=True)
class LayerSpec:
  """What one layer is made of; consecutive layers with equal specs are scanned together."""

  attention: str = 'dense'
  feed_forward: str = 'mlp'


def layer_specs(cfg: ModelConfig) -> list[LayerSpec]:
  """The spec of every layer, from the config (routed kinds where their config asks for them)."""
  specs = []
  for i in range(cfg.num_layers):
    routing = i in cfg.attention.routing_layers_resolved(cfg.num_layers)
    # kind='routing', non_routing='local' (the paper's layout): only local heads between them
    local = cfg.attention.kind == 'routing' and cfg.attention.non_routing == 'local'
    attention = 'routing' if routing else 'local' if local else 'dense'
    feed_forward = 'moe' if cfg.moe.is_moe_layer(i) else 'mlp'
    if cfg.uoe.is_smha_layer(i, cfg.num_layers):  # Union of Experts: uoe.layers (() = every layer)
      attention = 'smha'
    if cfg.uoe.is_uome_layer(i, cfg.num_layers):
      feed_forward = 'uome'
    specs.append(LayerSpec(attention, feed_forward))
  return specs


def empty_aux() -> dict:
  """The aux value of a layer without routing: no loss, no metrics, no stats."""
  return {'loss': jnp.zeros((), jnp.float32), 'metrics': {}, 'stats': {}}


def _split(out) -> tuple[jax.Array, dict]:
  if isinstance(out, tuple):
    y, aux = out
    return y, {**empty_aux(), **aux}
  return out, empty_aux()


class Block(nnx.Module):
  """One decoder layer; `__call__` returns (x_BLD, aux) with the sublayers' aux combined."""

  def __init__(self, cfg: ModelConfig, spec: LayerSpec = LayerSpec(), *, rngs: nnx.Rngs):
    self.attn_norm = RMSNorm(cfg, rngs=rngs)
    self.attn = ATTENTION[spec.attention](cfg, rngs=rngs)
    self.mlp_norm = RMSNorm(cfg, rngs=rngs)
    self.mlp = FEED_FORWARD[spec.feed_forward](cfg, rngs=rngs)

  def __call__(
    self, x_BLD: jax.Array, positions_BL: jax.Array, segment_ids_BL: jax.Array | None = None
  ) -> tuple[jax.Array, dict]:
    y_BLD, attn_aux = _split(self.attn(self.attn_norm(x_BLD), positions_BL, segment_ids_BL))
    x_BLD = axes.constrain(x_BLD + y_BLD, RESIDUAL)
    y_BLD, mlp_aux = _split(self.mlp(self.mlp_norm(x_BLD), segment_ids_BL))
    x_BLD = axes.constrain(x_BLD + y_BLD, RESIDUAL)
    aux = {
      'loss': attn_aux['loss'] + mlp_aux['loss'],
      'metrics': {**attn_aux['metrics'], **mlp_aux['metrics']},
      'stats': {
        name: a['stats']
        for name, a in (('attn', attn_aux), ('mlp', mlp_aux))
        if jax.tree.leaves(a['stats'])
      },
    }
    return x_BLD, aux

  def update_state(self, stats: dict) -> None:
    """Updates the sublayers' non-gradient state from this layer's forward statistics."""
    for name, sub_stats in stats.items():
      getattr(self, name).update_state(sub_stats)
