"""Routing attention (Roy et al. 2021): content-based sparse attention by online k-means.

Pure, jit-able functions; the layer in `model/routing_layer.py` owns the state and calls them.

- `routing_attention`: each of the N means of a head takes its top-`window` queries and, separately,
  keys by dot product (balanced clusters, static shapes); attention runs inside each cluster with
  the causal mask on ORIGINAL positions; outputs are scattered back and averaged over the clusters
  that picked a token; a token no cluster picked gets zeros. Memory is O(B·H·N·W·(W + K)) for the
  clusters plus O(B·H·N·L) for the selection scores, i.e. O(L·W) when N = L / W and L <= W².
- `kmeans_stats` / `kmeans_ema_update`: the EMA k-means of the google implementation (sums and
  counts of the nearest-mean assignment, decay 0.999, Laplace smoothing of the counts).
- `commitment_loss`: mean squared distance of each vector to its (stop-gradient) nearest mean.

Tokens with segment id 0 (`model.validity`) are invisible: a cluster takes them only after every
valid token (when the window is longer than the valid tokens), and no query ever sees them as keys.
Selection runs in f32 whatever the compute dtype; attention inside the clusters in v's dtype.
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp

from model import flash

_MASKED = -1e30  # finite, so fully masked rows give a uniform softmax (no NaN) that is then zeroed


def _to_bh(x_BLHK: jax.Array) -> jax.Array:
  return jnp.transpose(x_BLHK, (0, 2, 1, 3))


def balanced_assignment(
  x_BHLK: jax.Array, means_HNK: jax.Array, window: int, valid_BL: jax.Array | None = None
) -> jax.Array:
  """[B, H, N, W] int32: per mean, the `window` positions with the highest dot product, in time order.

  Selection is a hard top-k in f32, so no gradient flows through it (neither to x nor to the
  means). Invalid positions rank below every valid one.
  """
  x_BHLK, means_HNK = jax.lax.stop_gradient(
    (x_BHLK.astype(jnp.float32), means_HNK.astype(jnp.float32))
  )
  dots_BHNL = jnp.einsum('bhlk,hnk->bhnl', x_BHLK, means_HNK)
  if valid_BL is not None:
    dots_BHNL = jnp.where(valid_BL[:, None, None, :], dots_BHNL, -jnp.inf)
  _, idx_BHNW = jax.lax.top_k(dots_BHNL, window)
  return jnp.sort(idx_BHNW, axis=-1).astype(jnp.int32)


def _gather(x_BHLK: jax.Array, idx_BHNW: jax.Array) -> jax.Array:
  """x[b, h, idx[b, h, n, w]] -> [B, H, N, W, K]."""
  return jax.vmap(jax.vmap(lambda x_LK, i_NW: x_LK[i_NW]))(x_BHLK, idx_BHNW)


def _scatter_add(values_BHNW_: jax.Array, idx_BHNW: jax.Array, length: int) -> jax.Array:
  """Sum of `values` into their positions: [B, H, N, W, ...] -> [B, H, L, ...]."""

  def one(v_NW_, i_NW):
    flat = v_NW_.reshape(-1, *v_NW_.shape[2:])
    return jnp.zeros((length, *flat.shape[1:]), flat.dtype).at[i_NW.reshape(-1)].add(flat)

  return jax.vmap(jax.vmap(one))(values_BHNW_, idx_BHNW)


def _folded(qc_BHNWK, vc_BHNWK, seg_BHNW, *, impl: str, causal: bool, scale: float):
  """Shared-QK clusters as a batch of [W] sequences through a flash kernel: (out_c f32, seen).

  A cluster's members are in time order and are its keys too, so the causal mask on original
  positions is the plain causal mask on W and each query sees itself. Segment ids ride along per
  cluster; a segment-0 query (the reference lets it see no key) sees only segment-0 keys here,
  and its output is zeroed and left out of the average afterwards, as the reference does.
  """
  b, h, n, w, kd = qc_BHNWK.shape
  fold = lambda x: x.reshape(b * h * n, w, 1, kd)
  seg = None if seg_BHNW is None else seg_BHNW.reshape(b * h * n, w)
  qf = fold(qc_BHNWK)
  out = flash.flash_attention(
    qf, qf, fold(vc_BHNWK), segment_ids_BL=seg, impl=impl, causal=causal, scale=scale
  )
  out_c = out.reshape(b, h, n, w, kd).astype(jnp.float32)
  if seg_BHNW is None:
    return out_c, jnp.ones((b, h, n, w), bool)
  seen_BHNW = seg_BHNW != 0
  return jnp.where(seen_BHNW[..., None], out_c, 0.0), seen_BHNW


class RoutingOutput(NamedTuple):
  out_BLHK: jax.Array
  picks_BHL: jax.Array  # int32: how many clusters picked each query (0: it gets zeros)


def routing_attention(
  q_BLHK: jax.Array,
  k_BLHK: jax.Array,
  v_BLHK: jax.Array,
  means_HNK: jax.Array,
  *,
  window: int,
  causal: bool = True,
  scale: float | None = None,
  segment_ids_BL: jax.Array | None = None,
  impl: str | None = None,
) -> RoutingOutput:
  """Clustered attention: `RoutingOutput(out_BLHK, picks_BHL)`, the output and how many clusters
  picked each query (a caller that drops the count under jit pays nothing for it).

  Queries and keys are selected separately; when `k_BLHK is q_BLHK` (shared QK) the selection is
  computed once, from q and the means in f32 (pass q in f32 for an f32 selection; the clusters'
  attention runs in v's dtype). The causal mask compares the gathered original positions, so it
  is exact whether or not the query and key sets coincide. With `segment_ids_BL` a query only sees
  keys of its own segment and never a key of segment 0 (invisible tokens, ranked last by the
  selection). A query that sees no key inside a cluster gets nothing from that cluster and that
  cluster is left out of its average.

  `impl` (a resolved `model.flash` kernel: 'xla', 'cudnn', 'splash') folds the clusters into the
  batch axis and runs them through that kernel (`_folded`); None is the reference einsum path.
  Folding needs shared QK: with separate keys the reference path runs whatever `impl` says.
  """
  b, l, h, kd = q_BLHK.shape
  if window > l:
    raise ValueError(f'window={window} exceeds the sequence length {l}')
  scale = kd**-0.5 if scale is None else scale
  q_BHLK, v_BHLK = _to_bh(q_BLHK), _to_bh(v_BLHK)
  k_BHLK = q_BHLK if k_BLHK is q_BLHK else _to_bh(k_BLHK)
  valid_BL = None if segment_ids_BL is None else segment_ids_BL != 0
  idx_q = balanced_assignment(q_BHLK, means_HNK, window, valid_BL)
  idx_k = idx_q if k_BLHK is q_BLHK else balanced_assignment(k_BHLK, means_HNK, window, valid_BL)

  qc = _gather(q_BHLK, idx_q).astype(v_BLHK.dtype)
  kc = _gather(k_BHLK, idx_k).astype(v_BLHK.dtype)
  vc = _gather(v_BHLK, idx_k)
  seg_q = seg_k = None
  if segment_ids_BL is not None:
    seg_BHL = jnp.broadcast_to(segment_ids_BL[:, None, :], (b, h, l))
    take = jax.vmap(jax.vmap(lambda s_L, i_NW: s_L[i_NW]))
    seg_q, seg_k = take(seg_BHL, idx_q), take(seg_BHL, idx_k)
  if impl is not None and k_BLHK is q_BLHK:
    out_c, seen_BHNW = _folded(qc, vc, seg_q, impl=impl, causal=causal, scale=scale)
  else:
    logits = jnp.einsum('bhnik,bhnjk->bhnij', qc, kc, preferred_element_type=jnp.float32) * scale
    mask = jnp.ones(logits.shape, bool)
    if causal:
      mask = idx_q[..., :, None] >= idx_k[..., None, :]
    if segment_ids_BL is not None:
      mask = mask & (seg_q[..., :, None] == seg_k[..., None, :]) & (seg_k[..., None, :] != 0)
    probs = jax.nn.softmax(jnp.where(mask, logits, _MASKED), axis=-1)
    seen_BHNW = jnp.any(mask, axis=-1)
    probs = jnp.where(seen_BHNW[..., None], probs, 0.0)
    out_c = jnp.einsum(
      'bhnij,bhnjk->bhnik', probs.astype(v_BLHK.dtype), vc, preferred_element_type=jnp.float32
    )

  total_BHLK = _scatter_add(out_c, idx_q, l)
  count_BHL = _scatter_add(seen_BHNW.astype(jnp.float32), idx_q, l)
  out_BHLK = total_BHLK / jnp.maximum(count_BHL, 1.0)[..., None]
  out_BLHK = _to_bh(out_BHLK).astype(v_BLHK.dtype)
  return RoutingOutput(out_BLHK, _scatter_add(jnp.ones(idx_q.shape, jnp.int32), idx_q, l))


def nearest_mean(x_BLHK: jax.Array, means_HNK: jax.Array) -> jax.Array:
  """[B, L, H] int32: argmax over the means of the dot product (the k-means assignment)."""
  dots_BLHN = jnp.einsum('blhk,hnk->blhn', x_BLHK, means_HNK, preferred_element_type=jnp.float32)
  return jnp.argmax(dots_BLHN, axis=-1).astype(jnp.int32)


def kmeans_stats(
  x_BLHK: jax.Array, means_HNK: jax.Array, weights_BL: jax.Array | None = None
) -> dict:
  """Sufficient statistics of one batch (no gradient): {'count_HN', 'sum_HNK'} of the assignment.

  Computed from the global batch under jit, so they are already reduced over data parallelism.
  """
  x_BLHK, means_HNK = jax.lax.stop_gradient((x_BLHK.astype(jnp.float32), means_HNK))
  hot_BLHN = jax.nn.one_hot(nearest_mean(x_BLHK, means_HNK), means_HNK.shape[1], dtype=jnp.float32)
  if weights_BL is not None:
    hot_BLHN = hot_BLHN * weights_BL[:, :, None, None].astype(jnp.float32)
  return {
    'count_HN': hot_BLHN.sum((0, 1)),
    'sum_HNK': jnp.einsum('blhn,blhk->hnk', hot_BLHN, x_BLHK),
  }


def kmeans_ema_update(
  ema_sum_HNK: jax.Array,
  ema_count_HN: jax.Array,
  stats: dict,
  *,
  decay: float = 0.999,
  eps: float = 1e-5,
):
  """One EMA step: returns (means_HNK, ema_sum_HNK, ema_count_HN).

  Counts are Laplace-smoothed (an empty cluster keeps a tiny count, never divides by zero); the
  smoothed counts are what is stored, as in the google code. Means are not renormalised.
  """
  count = decay * ema_count_HN + (1 - decay) * stats['count_HN']
  ema_sum = decay * ema_sum_HNK + (1 - decay) * stats['sum_HNK']
  n = count.sum(-1, keepdims=True)
  count = (count + eps) / (n + count.shape[-1] * eps) * n
  return ema_sum / count[..., None], ema_sum, count


def commitment_loss(
  x_BLHK: jax.Array, means_HNK: jax.Array, weights_BL: jax.Array | None = None
) -> jax.Array:
  """mean((x - sg(means[nearest]))²) over tokens, heads and channels, in f32."""
  x32 = x_BLHK.astype(jnp.float32)
  means_HNK = jax.lax.stop_gradient(means_HNK.astype(jnp.float32))
  assign_BLH = jax.lax.stop_gradient(nearest_mean(x32, means_HNK))
  target_BLHK = means_HNK[jnp.arange(means_HNK.shape[0])[None, None, :], assign_BLH]
  sq_BL = jnp.square(x32 - target_BLHK).mean((2, 3))
  if weights_BL is None:
    return sq_BL.mean()
  w = weights_BL.astype(jnp.float32)
  return (sq_BL * w).sum() / jnp.maximum(w.sum(), 1.0)
