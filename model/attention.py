"""Dense causal multi-head attention with grouped-query heads, RoPE and optional document masks."""

import jax
import jax.numpy as jnp
from flax import nnx

from model import axes, flash
from model.config import ModelConfig
from model.layers import apply_rope, init_normal, token_matmul


def attention_impl(impl: str, dtype, platform: str | None = None) -> str:
  """The kernel for a config value (`model.flash.resolve_impl`): 'auto' is splash on TPU, cuDNN
  on GPU with a half-precision compute dtype, chunked on CPU, XLA elsewhere."""
  return flash.resolve_impl(impl, dtype, platform)


def segment_mask(segment_ids_BL: jax.Array) -> jax.Array:
  """[B, 1, L, L] boolean mask: query and key belong to the same packed segment."""
  return segment_ids_BL[:, None, :, None] == segment_ids_BL[:, None, None, :]


def causal_attention(
  q_BLHK: jax.Array,
  k_BLGK: jax.Array,
  v_BLGK: jax.Array,
  *,
  segment_ids_BL: jax.Array | None = None,
  impl: str = 'xla',
) -> jax.Array:
  """Causal softmax attention (softmax in f32); G kv heads serve H // G query heads each.

  With `segment_ids_BL`, a token attends only to earlier tokens of its own segment (packed
  documents). 'xla' is the reference, a dense [B, 1, L, L] mask; 'chunked' scores query chunks
  against their key prefix only (`model.chunked_attention`); 'cudnn' and 'splash' run the
  platform's flash kernel (`model.flash.flash_attention`; cuDNN refuses segment ids).
  """
  if impl != 'xla':
    return flash.flash_attention(q_BLHK, k_BLGK, v_BLGK, segment_ids_BL=segment_ids_BL, impl=impl)
  mask = None if segment_ids_BL is None else segment_mask(segment_ids_BL)
  return jax.nn.dot_product_attention(
    q_BLHK, k_BLGK, v_BLGK, mask=mask, is_causal=True, implementation=impl
  )


def qk_norm(x_BLNK: jax.Array, scale_NK: jax.Array, eps: float) -> jax.Array:
  """RMSNorm of a projection over all its heads' channels together (OLMoE's q/k norm), in f32."""
  x32 = x_BLNK.astype(jnp.float32)
  y = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=(-2, -1), keepdims=True) + eps)
  return (y * scale_NK.astype(jnp.float32)).astype(x_BLNK.dtype)


class Attention(nnx.Module):
  """Projections around `causal_attention`: wq [D,H,K], wk/wv [D,G,K], wo [H,K,D]; with
  `attention.qk_norm` the projected q and k are RMS-normalised over all their heads' channels
  (scales q_norm [H,K], k_norm [G,K]) before RoPE, as OLMoE does."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    self.dtype = jnp.dtype(cfg.dtype)
    self.rope_theta = cfg.rope_theta
    self.impl = cfg.attention.impl
    self.kernel = flash.check_impl(self.impl, self.dtype)  # refuses a kernel this process lacks
    d, h, g, k = cfg.d_model, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    pd = cfg.param_dtype
    self.wq = axes.param(rngs, init_normal(cfg), (d, h, k), ('embed', 'heads', 'kv'), pd)
    self.wk = axes.param(rngs, init_normal(cfg), (d, g, k), ('embed', 'kv_heads', 'kv'), pd)
    self.wv = axes.param(rngs, init_normal(cfg), (d, g, k), ('embed', 'kv_heads', 'kv'), pd)
    self.wo = axes.param(
      rngs, init_normal(cfg, output=True), (h, k, d), ('heads', 'kv', 'embed'), pd
    )
    self.norm_eps = cfg.norm_eps
    if cfg.attention.qk_norm:
      ones = jax.nn.initializers.ones
      self.q_norm = axes.param(rngs, ones, (h, k), ('heads', 'kv'), pd)
      self.k_norm = axes.param(rngs, ones, (g, k), ('kv_heads', 'kv'), pd)

  METRICS = None  # prefix of the per-layer metrics it reports (None: none)
  GATED = False  # no learned router for the entropy trigger to monitor

  @staticmethod
  def reads_future(cfg: ModelConfig) -> str | None:
    """Causal mask (and segment mask): the output at t never reads a later token."""
    del cfg
    return None

  @staticmethod
  def num_params(cfg: ModelConfig) -> int:
    """wq and wo (D·H·K each), wk and wv (D·G·K each); with qk_norm the scales (H·K + G·K)."""
    heads = cfg.num_heads + cfg.num_kv_heads
    norms = heads * cfg.head_dim if cfg.attention.qk_norm else 0
    return 2 * cfg.d_model * cfg.head_dim * heads + norms

  @staticmethod
  def active_params(cfg: ModelConfig, seq_len: int) -> float:
    """Matmul weights per token: every projection sees every token (norm scales excluded)."""
    del seq_len
    return 2 * cfg.d_model * cfg.head_dim * (cfg.num_heads + cfg.num_kv_heads)

  @classmethod
  def score_flops(cls, cfg: ModelConfig, seq_len: int) -> float:
    """Training FLOPs per token of scores and weighted sum: 3 (forward, backward) · 2 matmuls ·
    2 FLOPs per multiply-add · H·K = D, times the keys each query is scored against."""
    return 12.0 * cfg.d_model * cls.keys_per_query(cfg, seq_len)

  @staticmethod
  def keys_per_query(cfg: ModelConfig, seq_len: int) -> float:
    """All S keys: the causal mask is not discounted (the PaLM convention; the kernel computes
    the whole score matrix)."""
    del cfg
    return seq_len

  @staticmethod
  def describe(cfg: ModelConfig) -> str:
    return f'causal attention, {cfg.num_heads} heads, {cfg.num_kv_heads} kv heads'

  def __call__(
    self, x_BLD: jax.Array, positions_BL: jax.Array, segment_ids_BL: jax.Array | None = None
  ) -> jax.Array:
    cast = lambda w: w[...].astype(self.dtype)
    x_BLD = x_BLD.astype(self.dtype)
    q_BLHK = token_matmul(x_BLD, cast(self.wq))
    k_BLGK = token_matmul(x_BLD, cast(self.wk))
    v_BLGK = token_matmul(x_BLD, cast(self.wv))
    if hasattr(self, 'q_norm'):
      q_BLHK = qk_norm(q_BLHK, self.q_norm[...], self.norm_eps)
      k_BLGK = qk_norm(k_BLGK, self.k_norm[...], self.norm_eps)
    q_BLHK = apply_rope(q_BLHK, positions_BL, self.rope_theta)
    k_BLGK = apply_rope(k_BLGK, positions_BL, self.rope_theta)
    q_BLHK = axes.constrain(q_BLHK, ('batch', 'length', 'act_heads', 'act_kv'))
    k_BLGK = axes.constrain(k_BLGK, ('batch', 'length', 'act_kv_heads', 'act_kv'))
    v_BLGK = axes.constrain(v_BLGK, ('batch', 'length', 'act_kv_heads', 'act_kv'))
    o_BLHK = self.attend(q_BLHK, k_BLGK, v_BLGK, segment_ids_BL)
    o_BLHK = axes.constrain(o_BLHK, ('batch', 'length', 'act_heads', 'act_kv'))
    return token_matmul(o_BLHK, cast(self.wo))

  def attend(
    self, q_BLHK: jax.Array, k_BLGK: jax.Array, v_BLGK: jax.Array, segment_ids_BL: jax.Array | None
  ) -> jax.Array:
    """The attention between the projections (full causal here; local in `LocalAttention`)."""
    return causal_attention(
      q_BLHK,
      k_BLGK,
      v_BLGK,
      segment_ids_BL=segment_ids_BL,
      impl=flash.call_kernel(self.kernel, self.impl, segment_ids_BL is not None),
    )
