"""Pre-norm transformer block and the protocol its sublayers follow.

Attention sublayers are called as `(x_BLD, positions_BL, segment_ids_BL)`, feed-forward ones as
`(x_BLD, segment_ids_BL)`: segment ids keep packed documents apart and id 0 marks tokens that are
not there (`model.validity`). Every kind also declares what it is without being built (causality,
parameter and FLOP counts, the metrics it reports: see `model.registry`), which the layer plan
(`model.plan`) gathers.
A sublayer returns either an array (dense) or `(y, aux)` (routed), where aux is
`{'loss': f32 scalar of weighted aux losses, 'metrics': {name: scalar}, 'stats': pytree}`.
`stats` feed `update_state(stats)`, which the train step calls after the gradient to update the
layer's non-gradient `axes.RoutingState` (never during rematerialisation). Which attention and
feed-forward a layer gets is its `LayerSpec` (`ModelConfig.layer_specs`); kinds are looked up by
name in `model.registry`.
"""

import jax
import jax.numpy as jnp
from flax import nnx

from model import axes, registry
from model.config import LayerSpec, ModelConfig
from model.layers import RMSNorm


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
    self.attn = registry.lookup('attention kind', spec.attention, 'attention')(cfg, rngs=rngs)
    self.mlp_norm = RMSNorm(cfg, rngs=rngs)
    self.mlp = registry.lookup('feed-forward kind', spec.feed_forward, 'feed_forward')(
      cfg, rngs=rngs
    )

  def __call__(
    self, x_BLD: jax.Array, positions_BL: jax.Array, segment_ids_BL: jax.Array | None = None
  ) -> tuple[jax.Array, dict]:
    y_BLD, attn_aux = _split(self.attn(self.attn_norm(x_BLD), positions_BL, segment_ids_BL))
    x_BLD = axes.constrain(x_BLD + y_BLD, axes.RESIDUAL)
    y_BLD, mlp_aux = _split(self.mlp(self.mlp_norm(x_BLD), segment_ids_BL))
    x_BLD = axes.constrain(x_BLD + y_BLD, axes.RESIDUAL)
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
