"""The Routing Transformer's attention layer: routing heads and local heads, one output projection.

Heads [0, R) are routing heads: a shared query/key projection, layer-normalised without scale or
bias, clustered by the layer's k-means means (`axes.RoutingState`, one table per head) and attended
with `routing_attention`; no RoPE (selection and attention are content-based; position reaches them
through the residual stream and the causal mask). Heads [R, H) are local heads: RoPE and blocked
causal sliding-window attention, grouped-query like the dense layer. Both concatenate on the head
axis before `wo`.

`__call__` returns `(y_BLD, aux)`: aux['loss'] is the weighted commitment loss, aux['metrics'] the
per-layer routing metrics, aux['stats'] the k-means statistics of the (global) batch that
`update_state` turns into one EMA step after the gradient. Tokens with segment id 0
(`model.validity`) are invisible to the clusters and left out of the k-means statistics, the
commitment loss and the metrics. Selection and k-means run in f32 whatever the compute dtype.
"""

import jax
import jax.numpy as jnp
from flax import nnx

from model import axes, flash, validity
from model.config import ModelConfig
from model.layers import apply_rope, init_normal, token_matmul
from model.local_attention import local_attention
from model.routing_attention import (
  commitment_loss,
  kmeans_ema_update,
  kmeans_stats,
  routing_attention,
)


def layer_norm(x: jax.Array, eps: float = 1e-6) -> jax.Array:
  """LayerNorm over the last axis without scale or bias, in f32."""
  x32 = x.astype(jnp.float32)
  mean = x32.mean(-1, keepdims=True)
  var = jnp.square(x32 - mean).mean(-1, keepdims=True)
  return (x32 - mean) * jax.lax.rsqrt(var + eps)


def init_means(key: jax.Array, heads: int, clusters: int, head_dim: int) -> jax.Array:
  """Normalised random vectors (LayerNorm of a standard normal draw, as the google code)."""
  return layer_norm(jax.random.normal(key, (heads, clusters, head_dim)))


class RoutingAttention(nnx.Module):
  """Attention with R routing heads and H - R local heads (R = attention.routing_heads)."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    a = cfg.attention
    if a.num_clusters <= 0:
      raise ValueError(
        'attention.num_clusters is unresolved (0); load the config with '
        'configs.schema.load, which derives it from train.seq_len // attention.window'
      )
    self.dtype = jnp.dtype(cfg.dtype)
    self.impl, self.kernel = a.impl, flash.check_impl(a.impl, self.dtype)  # refuses a missing one
    self.rope_theta = cfg.rope_theta
    self.window, self.local_window = a.window, a.local_window
    self.decay, self.commitment_weight = a.kmeans_decay, a.commitment_weight
    # LN(q) has unit variance per channel, so q·k grows like K: K**-0.5 keeps logits O(1); the
    # google code uses no scale ('none'), sharper attention inside the clusters.
    self.scale = cfg.head_dim**-0.5 if a.routing_scale == 'rsqrt_dim' else 1.0
    d, h, k, pd = cfg.d_model, cfg.num_heads, cfg.head_dim, cfg.param_dtype
    self.r, self.g = r, g = self._heads(cfg)
    self.wq = axes.param(rngs, init_normal(cfg), (d, h, k), ('embed', 'heads', 'kv'), pd)
    self.wo = axes.param(
      rngs, init_normal(cfg, output=True), (h, k, d), ('heads', 'kv', 'embed'), pd
    )
    self.wv_routing = axes.param(rngs, init_normal(cfg), (d, r, k), ('embed', None, 'kv'), pd)
    if g:
      self.wk = axes.param(rngs, init_normal(cfg), (d, g, k), ('embed', None, 'kv'), pd)
      self.wv = axes.param(rngs, init_normal(cfg), (d, g, k), ('embed', None, 'kv'), pd)
    means = init_means(rngs.params(), r, a.num_clusters, k)
    names = (None, None, None)
    self.means = axes.routing_state(means, names)
    self.ema_sum = axes.routing_state(means, names)  # the init counts as one observation per mean
    self.ema_count = axes.routing_state(jnp.ones((r, a.num_clusters), jnp.float32), names[:2])

  def __call__(
    self, x_BLD: jax.Array, positions_BL: jax.Array, segment_ids_BL: jax.Array | None = None
  ) -> tuple[jax.Array, dict]:
    cast = lambda w: w[...].astype(self.dtype)
    x_BLD = x_BLD.astype(self.dtype)
    b, l, _ = x_BLD.shape
    r = self.r
    q_BLHK = token_matmul(x_BLD, cast(self.wq))
    q_BLHK = axes.constrain(q_BLHK, ('batch', 'length', 'act_heads', 'act_kv'))
    outs = []

    # routing heads: shared QK, LN without affine, balanced k-means clusters
    qr_BLRK = layer_norm(q_BLHK[:, :, :r])
    vr_BLRK = token_matmul(x_BLD, cast(self.wv_routing))
    means_RNK = self.means[...]
    window = min(self.window, l)  # a prefix shorter than the window (sampling) is one dense cluster
    # selection from the f32 LN(q) and means; attention inside the clusters in the compute dtype,
    # folded into the batch axis through the flash kernel (xla, chunked: the reference einsum path)
    kernel = flash.call_kernel(self.kernel, self.impl, segment_ids_BL is not None)
    out_r, picks_BRL = routing_attention(
      qr_BLRK,
      qr_BLRK,
      vr_BLRK,
      means_RNK,
      window=window,
      scale=self.scale,
      segment_ids_BL=segment_ids_BL,
      impl=None if kernel in ('xla', 'chunked') else kernel,
    )
    outs.append(out_r)

    # local heads: RoPE, blocked causal sliding window
    if self.g:
      k_BLGK = token_matmul(x_BLD, cast(self.wk))
      v_BLGK = token_matmul(x_BLD, cast(self.wv))
      q_loc = apply_rope(q_BLHK[:, :, r:], positions_BL, self.rope_theta)
      k_BLGK = apply_rope(k_BLGK, positions_BL, self.rope_theta)
      local_w, seg = min(self.local_window, l), segment_ids_BL
      if kernel == 'splash':  # the blocked mask inside the kernel; cuDNN has none: XLA
        o_loc = flash.flash_attention(
          q_loc, k_BLGK, v_BLGK, segment_ids_BL=seg, impl='splash', local_window=local_w
        )
      else:
        o_loc = local_attention(q_loc, k_BLGK, v_BLGK, window=local_w, segment_ids_BL=seg)
      outs.append(o_loc)
    o_BLHK = jnp.concatenate(outs, axis=2) if len(outs) > 1 else outs[0]
    o_BLHK = axes.constrain(o_BLHK.astype(self.dtype), ('batch', 'length', 'act_heads', 'act_kv'))
    y_BLD = token_matmul(o_BLHK, cast(self.wo))

    valid_BL = validity.valid_tokens(segment_ids_BL, b, l)
    stats = kmeans_stats(qr_BLRK, means_RNK, valid_BL)
    commit = commitment_loss(qr_BLRK, means_RNK, valid_BL)
    new_means = kmeans_ema_update(self.ema_sum[...], self.ema_count[...], stats, decay=self.decay)[
      0
    ]
    # tokens nearest each mean per sequence, relative to the window (b * l valid tokens: b * window)
    valid_share = jnp.maximum(valid_BL.sum(), 1).astype(jnp.float32) / (b * l)
    occupancy_RN = stats['count_HN'] / (b * window * valid_share)
    valid_BRL = jnp.broadcast_to(valid_BL[:, None, :], picks_BRL.shape)
    metrics = {
      'routing/occupancy_min': occupancy_RN.min(),
      'routing/occupancy_max': occupancy_RN.max(),
      'routing/unpicked_fraction': validity.masked_mean(
        (picks_BRL == 0).reshape(-1), valid_BRL.reshape(-1)
      ),
      'routing/multi_picked_fraction': validity.masked_mean(
        (picks_BRL > 1).reshape(-1), valid_BRL.reshape(-1)
      ),
      'routing/commitment_loss': commit,
      'routing/centroid_drift': jnp.linalg.norm(new_means - means_RNK, axis=-1).mean(),
    }
    return y_BLD, {'loss': self.commitment_weight * commit, 'metrics': metrics, 'stats': stats}

  @staticmethod
  def reads_future(cfg: ModelConfig) -> str | None:
    """Why the output at t can depend on tokens after t (None: it cannot)."""
    del cfg
    return (
      'routing attention: each k-means cluster takes the top-window tokens of the whole row, '
      'so later tokens decide which earlier tokens share a cluster'
    )

  METRICS = 'routing/'  # prefix of the per-layer metrics it reports
  GATED = False  # clusters, not a learned router: nothing for the entropy trigger to monitor

  @staticmethod
  def _heads(cfg: ModelConfig) -> tuple[int, int]:
    """(R routing heads, G local kv heads): the local heads keep the model's GQA ratio."""
    h = cfg.num_heads
    r = cfg.attention.resolved_routing_heads(h)
    return r, cfg.num_kv_heads * (h - r) // h

  @classmethod
  def num_params(cls, cfg: ModelConfig) -> int:
    """wq and wo of all H heads, wv_routing of the R routing heads (their keys are their
    queries), wk and wv of the G local kv heads; the k-means means are state, not parameters."""
    r, g = cls._heads(cfg)
    return cfg.d_model * cfg.head_dim * (2 * cfg.num_heads + r + 2 * g)

  @classmethod
  def active_params(cls, cfg: ModelConfig, seq_len: int) -> float:
    del seq_len
    return cls.num_params(cfg)

  @classmethod
  def score_flops(cls, cfg: ModelConfig, seq_len: int) -> float:
    """Training FLOPs per token of scores and weighted sum (12·K per key, as dense attention):
    a routing head scores N clusters of W tokens against each other, N·W²/S keys per token on
    average; a local head its 2·W_local block keys."""
    a, k, (r, _) = cfg.attention, cfg.head_dim, cls._heads(cfg)
    w, w_local = min(a.window, seq_len), min(a.local_window, seq_len)
    routing_keys = a.num_clusters * w * w / seq_len
    return 12.0 * k * (r * routing_keys + (cfg.num_heads - r) * 2 * w_local)

  @classmethod
  def describe(cls, cfg: ModelConfig) -> str:
    a, (r, _) = cfg.attention, cls._heads(cfg)
    return (
      f'routing attention: {r} routing heads ({a.num_clusters} clusters of {a.window}), '
      f'{cfg.num_heads - r} local heads (window {a.local_window})'
    )

  def update_state(self, stats: dict) -> None:
    """One EMA k-means step from this layer's forward statistics (called after the gradient)."""
    means, ema_sum, ema_count = kmeans_ema_update(
      self.ema_sum[...], self.ema_count[...], stats, decay=self.decay
    )
    self.means[...] = means
    self.ema_sum[...] = ema_sum
    self.ema_count[...] = ema_count
