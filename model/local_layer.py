"""Local-only attention: every head is a blocked causal sliding-window head.

The Routing Transformer's non-routing layers (`attention.non_routing='local'`): the paper's code
makes every head of a layer without routing heads a local head, so the whole model is O(L·W) in
time and memory instead of O(L²) for full causal attention. Same parameters, RoPE and grouped-query
heads as the dense `Attention`; only the mask differs (`local_attention`: each block of
`attention.local_window` queries sees its own block and the previous one).
"""

import jax
import jax.numpy as jnp
from flax import nnx

from model import axes
from model.config import ModelConfig
from model.layers import apply_rope, init_normal
from model.local_attention import local_attention


class LocalAttention(nnx.Module):
  """Projections around `local_attention`: wq [D,H,K], wk/wv [D,G,K], wo [H,K,D]."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    self.dtype = jnp.dtype(cfg.dtype)
    self.rope_theta = cfg.rope_theta
    self.local_window = cfg.attention.local_window
    d, h, g, k = cfg.d_model, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    pd = cfg.param_dtype
    self.wq = axes.param(rngs, init_normal(cfg), (d, h, k), ('embed', 'heads', 'kv'), pd)
    self.wk = axes.param(rngs, init_normal(cfg), (d, g, k), ('embed', 'kv_heads', 'kv'), pd)
    self.wv = axes.param(rngs, init_normal(cfg), (d, g, k), ('embed', 'kv_heads', 'kv'), pd)
    self.wo = axes.param(rngs, init_normal(cfg, output=True), (h, k, d), ('heads', 'kv', 'embed'),
                         pd)

  @staticmethod
  def reads_future(cfg: ModelConfig) -> str | None:
    """Causal (and segment) mask inside the window: the output at t never reads a later token."""
    del cfg
    return None

  def __call__(self, x_BLD: jax.Array, positions_BL: jax.Array,
               segment_ids_BL: jax.Array | None = None) -> jax.Array:
    cast = lambda w: w[...].astype(self.dtype)
    x_BLD = x_BLD.astype(self.dtype)
    q_BLHK = jnp.einsum('bld,dhk->blhk', x_BLD, cast(self.wq))
    k_BLGK = jnp.einsum('bld,dgk->blgk', x_BLD, cast(self.wk))
    v_BLGK = jnp.einsum('bld,dgk->blgk', x_BLD, cast(self.wv))
    q_BLHK = apply_rope(q_BLHK, positions_BL, self.rope_theta)
    k_BLGK = apply_rope(k_BLGK, positions_BL, self.rope_theta)
    q_BLHK = axes.constrain(q_BLHK, ('batch', 'length', 'act_heads', 'act_kv'))
    k_BLGK = axes.constrain(k_BLGK, ('batch', 'length', 'act_kv_heads', 'act_kv'))
    v_BLGK = axes.constrain(v_BLGK, ('batch', 'length', 'act_kv_heads', 'act_kv'))
    window = min(self.local_window, x_BLD.shape[1])  # a prefix shorter than the window: one block
    o_BLHK = local_attention(q_BLHK, k_BLGK, v_BLGK, window=window, segment_ids_BL=segment_ids_BL)
    o_BLHK = axes.constrain(o_BLHK, ('batch', 'length', 'act_heads', 'act_kv'))
    return jnp.einsum('blhk,hkd->bld', o_BLHK, cast(self.wo))
