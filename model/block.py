"""Pre-norm transformer block: x + attn(norm(x)), then x + mlp(norm(x))."""

import jax
import jax.numpy as jnp
from flax import nnx

from model import axes
from model.attention import Attention
from model.config import ModelConfig
from model.layers import MLP, RMSNorm

RESIDUAL = ('batch', 'length', 'act_embed')


def empty_aux() -> dict:
  """The aux value of a layer without routing: no loss, no metrics.

  Routed layers return the same structure with their weighted aux losses summed into 'loss' and
  per-layer scalars in 'metrics'; the transformer sums losses and prefixes metrics by layer.
  """
  return {'loss': jnp.zeros((), jnp.float32), 'metrics': {}}


class Block(nnx.Module):
  """One dense decoder layer; `__call__` returns (x_BLD, aux)."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    self.attn_norm = RMSNorm(cfg, rngs=rngs)
    self.attn = Attention(cfg, rngs=rngs)
    self.mlp_norm = RMSNorm(cfg, rngs=rngs)
    self.mlp = MLP(cfg, rngs=rngs)

  def __call__(self, x_BLD: jax.Array, positions_BL: jax.Array,
               segment_ids_BL: jax.Array | None = None) -> tuple[jax.Array, dict]:
    x_BLD = x_BLD + self.attn(self.attn_norm(x_BLD), positions_BL, segment_ids_BL)
    x_BLD = axes.constrain(x_BLD, RESIDUAL)
    x_BLD = x_BLD + self.mlp(self.mlp_norm(x_BLD))
    return axes.constrain(x_BLD, RESIDUAL), empty_aux()
