"""Building blocks of the dense transformer: RMSNorm, RoPE, token embedding, SwiGLU MLP.

Parameters are stored in `cfg.param_dtype` and cast to the compute dtype `cfg.dtype` where they are
used; normalisation runs in f32 whatever the compute dtype.
"""

import math

import jax
import jax.numpy as jnp
from flax import nnx

from model import axes
from model.config import ModelConfig


def init_normal(cfg: ModelConfig, *, output: bool = False):
  """Normal(0, init_std); output projections into the residual stream get 1/sqrt(2*num_layers).

  The residual stream sums 2 * num_layers such projections, so scaling keeps its variance at init
  independent of depth (GPT-2 / Megatron convention).
  """
  std = cfg.init_std / math.sqrt(2 * cfg.num_layers) if output else cfg.init_std
  return jax.nn.initializers.normal(std)


def rms_norm(x: jax.Array, scale: jax.Array, eps: float) -> jax.Array:
  """x / rms(x) * scale along the last axis, computed in f32, returned in x's dtype."""
  x32 = x.astype(jnp.float32)
  y = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + eps)
  return (y * scale.astype(jnp.float32)).astype(x.dtype)


class RMSNorm(nnx.Module):
  """Root-mean-square norm with a learned per-channel scale (initialised to 1)."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    self.eps = cfg.norm_eps
    self.scale = axes.param(
      rngs, jax.nn.initializers.ones, (cfg.d_model,), ('norm',), cfg.param_dtype
    )

  def __call__(self, x_BLD: jax.Array) -> jax.Array:
    return rms_norm(x_BLD, self.scale[...], self.eps)


def apply_rope(x_BLHK: jax.Array, positions_BL: jax.Array, theta: float) -> jax.Array:
  """Rotary position embedding, rotate-half convention (GPT-NeoX / Llama).

  Channel i of the first half and channel i of the second half form a pair rotated by the angle
  position * theta**(-2i/K). Computed in f32 (angles at long positions need it), cast back.
  """
  half = x_BLHK.shape[-1] // 2
  inv_freq_F = theta ** (-jnp.arange(half, dtype=jnp.float32) / half)
  angles_BLF = positions_BL.astype(jnp.float32)[..., None] * inv_freq_F
  sin_BL1F = jnp.sin(angles_BLF)[:, :, None, :]
  cos_BL1F = jnp.cos(angles_BLF)[:, :, None, :]
  x32 = x_BLHK.astype(jnp.float32)
  x1, x2 = x32[..., :half], x32[..., half:]
  out = jnp.concatenate([x1 * cos_BL1F - x2 * sin_BL1F, x2 * cos_BL1F + x1 * sin_BL1F], axis=-1)
  return out.astype(x_BLHK.dtype)


class Embedding(nnx.Module):
  """Token embedding table [V, D]; `attend` gives the tied output logits x @ table.T."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    self.dtype = jnp.dtype(cfg.dtype)
    self.embedding = axes.param(
      rngs, init_normal(cfg), (cfg.vocab_size, cfg.d_model), ('vocab', 'embed'), cfg.param_dtype
    )

  def __call__(self, tokens_BL: jax.Array) -> jax.Array:
    """Gathers rows first, then casts: cheaper than casting the whole table."""
    return jnp.take(self.embedding[...], tokens_BL, axis=0).astype(self.dtype)

  def attend(self, x_BLD: jax.Array) -> jax.Array:
    """Logits against every row of the table, accumulated and returned in f32."""
    table_VD = self.embedding[...].astype(self.dtype)
    b, l, d = x_BLD.shape  # over the flattened tokens, as `token_matmul` and for its reason
    logits_TV = jnp.einsum(
      'td,vd->tv',
      x_BLD.reshape(b * l, d).astype(self.dtype),
      table_VD,
      preferred_element_type=jnp.float32,
    )
    return logits_TV.reshape(b, l, -1)


def token_matmul(x_BLI: jax.Array, w_IO: jax.Array) -> jax.Array:
  """x [B, L, *in] times w [*in, *out] -> [B, L, *out], contracting every `in` dimension: the
  einsum 'bl...,...->bl...' written as one 2-D matmul over the B·L tokens.

  Same products and sums as the einsum. The reason is the backward pass: the weight gradient of the
  3-D einsum contracts over (b, l), which XLA:CPU lowers by copying both operands into transposed
  layouts first; over flattened tokens it is one matmul with a transposed operand. The SwiGLU
  layer's forward and backward take 0.4x the einsums' time on 2 CPU cores (docs/performance.md).
  """
  b, l = x_BLI.shape[:2]
  fan_in = math.prod(x_BLI.shape[2:])
  y_TO = x_BLI.reshape(b * l, fan_in) @ w_IO.reshape(fan_in, -1)
  return y_TO.reshape(b, l, *w_IO.shape[x_BLI.ndim - 2 :])


def swiglu(
  x_BLD: jax.Array, w_gate_DF: jax.Array, w_up_DF: jax.Array, w_down_FD: jax.Array
) -> jax.Array:
  """(silu(x @ w_gate) * (x @ w_up)) @ w_down, in the dtype of its inputs, over the B·L tokens
  flattened (see `token_matmul`; the elementwise part too, which XLA:CPU also runs faster on the
  2-D array: 24 against 37 ms forward and backward at the demo shape)."""
  b, l, d = x_BLD.shape
  x_TD = x_BLD.reshape(b * l, d)
  h_TF = jax.nn.silu(x_TD @ w_gate_DF) * (x_TD @ w_up_DF)
  h_TF = axes.constrain(h_TF.reshape(b, l, -1), ('batch', 'length', 'act_mlp')).reshape(b * l, -1)
  return (h_TF @ w_down_FD).reshape(b, l, -1)


class MLP(nnx.Module):
  """Dense SwiGLU feed-forward layer."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    self.dtype = jnp.dtype(cfg.dtype)
    d, f = cfg.d_model, cfg.mlp_dim
    self.w_gate = axes.param(rngs, init_normal(cfg), (d, f), ('embed', 'mlp'), cfg.param_dtype)
    self.w_up = axes.param(rngs, init_normal(cfg), (d, f), ('embed', 'mlp'), cfg.param_dtype)
    self.w_down = axes.param(
      rngs, init_normal(cfg, output=True), (f, d), ('mlp', 'embed'), cfg.param_dtype
    )

  METRICS = None  # prefix of the per-layer metrics it reports (None: none)
  GATED = False  # no learned router for the entropy trigger to monitor

  @staticmethod
  def reads_future(cfg: ModelConfig) -> str | None:
    """Token-wise: the output at t never depends on another token."""
    del cfg
    return None

  @staticmethod
  def num_params(cfg: ModelConfig) -> int:
    """w_gate, w_up (D·F each) and w_down (F·D)."""
    return 3 * cfg.d_model * cfg.mlp_dim

  @classmethod
  def active_params(cls, cfg: ModelConfig, seq_len: int) -> float:
    """Matmul weights per token: all of them."""
    del seq_len
    return cls.num_params(cfg)

  @staticmethod
  def describe(cfg: ModelConfig) -> str:
    return f'SwiGLU MLP, hidden {cfg.mlp_dim}'

  def __call__(self, x_BLD: jax.Array, segment_ids_BL: jax.Array | None = None) -> jax.Array:
    del segment_ids_BL  # token-wise
    cast = lambda w: w[...].astype(self.dtype)
    return swiglu(x_BLD.astype(self.dtype), cast(self.w_gate), cast(self.w_up), cast(self.w_down))
