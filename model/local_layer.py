"""Local-only attention: every head is a blocked causal sliding-window head.

The Routing Transformer's non-routing layers (`attention.non_routing='local'`): the paper's code
makes every head of a layer without routing heads a local head, so the whole model is O(L·W) in
time and memory instead of O(L²) for full causal attention. Same parameters, RoPE and grouped-query
heads as the dense `Attention`; only the mask differs (`local_attention`: each block of
`attention.local_window` queries sees its own block and the previous one). With
`attention.impl` resolving to splash the mask runs inside the splash kernel; elsewhere (cuDNN has
only a sliding window, not this blocked mask) it is the XLA `local_attention`.
"""

import jax
from flax import nnx

from model import flash
from model.attention import Attention
from model.config import ModelConfig
from model.local_attention import local_attention


class LocalAttention(Attention):
  """The dense layer's projections (wq [D,H,K], wk/wv [D,G,K], wo [H,K,D], RoPE) around
  `local_attention` instead of full causal attention."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    super().__init__(cfg, rngs=rngs)
    self.local_window = cfg.attention.local_window

  @staticmethod
  def reads_future(cfg: ModelConfig) -> str | None:
    """Causal (and segment) mask inside the window: the output at t never reads a later token."""
    del cfg
    return None

  @staticmethod
  def keys_per_query(cfg: ModelConfig, seq_len: int) -> float:
    """The 2·W keys of its own and the previous block (W = min(local_window, S)), which the
    kernel scores whether masked or not."""
    return 2 * min(cfg.attention.local_window, seq_len)

  @staticmethod
  def describe(cfg: ModelConfig) -> str:
    return (
      f'local attention (window {cfg.attention.local_window}), {cfg.num_heads} heads, '
      f'{cfg.num_kv_heads} kv heads'
    )

  def attend(
    self, q_BLHK: jax.Array, k_BLGK: jax.Array, v_BLGK: jax.Array, segment_ids_BL: jax.Array | None
  ) -> jax.Array:
    window = min(self.local_window, q_BLHK.shape[1])  # a prefix shorter than the window: one block
    if self.kernel == 'splash':  # the blocked mask inside the kernel; cuDNN has none: XLA
      return flash.flash_attention(
        q_BLHK, k_BLGK, v_BLGK, segment_ids_BL=segment_ids_BL, impl='splash', local_window=window
      )
    return local_attention(q_BLHK, k_BLGK, v_BLGK, window=window, segment_ids_BL=segment_ids_BL)
