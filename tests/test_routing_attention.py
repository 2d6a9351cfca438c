"""Routing attention, k-means EMA and local attention against references."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from model.local_attention import local_attention
from model.routing_attention import (
  balanced_assignment,
  commitment_loss,
  kmeans_ema_update,
  kmeans_stats,
  routing_attention,
)


def normal(shape, seed):
  return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), jnp.float32)


def dense(q, k, v, causal=True, segment_ids=None):
  mask = (
    None if segment_ids is None else segment_ids[:, None, :, None] == segment_ids[:, None, None, :]
  )
  return jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=causal, implementation='xla')


@pytest.mark.parametrize('causal', [True, False])
def test_one_cluster_full_window_equals_dense_outputs_and_gradients(causal):
  b, l, h, kd = 2, 16, 3, 8
  q, k, v = normal((b, l, h, kd), 0), normal((b, l, h, kd), 1), normal((b, l, h, kd), 2)
  means = normal((h, 1, kd), 3)
  routed = jax.jit(
    lambda q, k, v: routing_attention(q, k, v, means, window=l, causal=causal).out_BLHK
  )
  ref = jax.jit(lambda q, k, v: dense(q, k, v, causal))
  np.testing.assert_allclose(routed(q, k, v), ref(q, k, v), rtol=1e-5, atol=1e-6)
  cot = normal((b, l, h, kd), 4)
  grads = lambda f: jax.jit(jax.grad(lambda *a: jnp.sum(f(*a) * cot), argnums=(0, 1, 2)))(q, k, v)
  for got, want in zip(grads(routed), grads(ref)):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_segment_ids_never_cross_documents():
  b, l, h, kd = 2, 12, 2, 4
  q, k, v = normal((b, l, h, kd), 5), normal((b, l, h, kd), 6), normal((b, l, h, kd), 7)
  seg = jnp.asarray([[1] * 5 + [2] * 7, [1] * 12], jnp.int32)
  out = jax.jit(
    lambda q, k, v: (
      routing_attention(q, k, v, normal((h, 1, kd), 8), window=l, segment_ids_BL=seg).out_BLHK
    )
  )(q, k, v)
  np.testing.assert_allclose(out, dense(q, k, v, True, seg), rtol=1e-5, atol=1e-6)


def test_segment_zero_is_invisible_and_never_outranks_a_valid_token():
  """Padding (segment id 0) is selected only after every valid token and never seen as a key:
  a padded prefix gives the prefix's outputs run alone, whatever the padding holds."""
  b, l, t, h, kd, n, w = 2, 24, 13, 2, 4, 3, 8
  q, v = normal((b, l, h, kd), 9), normal((b, l, h, kd), 10)
  means = normal((h, n, kd), 11)
  seg = jnp.broadcast_to((jnp.arange(l) < t).astype(jnp.int32), (b, l))
  run = jax.jit(
    lambda q, v, seg: routing_attention(q, q, v, means, window=w, segment_ids_BL=seg).out_BLHK
  )
  padded = run(q, v, seg)[:, :t]
  alone = jax.jit(lambda q, v: routing_attention(q, q, v, means, window=w).out_BLHK)(
    q[:, :t], v[:, :t]
  )
  np.testing.assert_allclose(padded, alone, rtol=1e-5, atol=1e-6)
  noise = 100 * normal((b, l, h, kd), 12)  # padding that would win every cluster if it could
  q2 = jnp.where((jnp.arange(l) < t)[None, :, None, None], q, noise)
  np.testing.assert_allclose(run(q2, v, seg)[:, :t], alone, rtol=1e-5, atol=1e-6)


def _hand_built():
  """Clusters known by construction: mean 0 takes tokens {0, 1}, mean 1 takes {0, 2}; 3 is unpicked."""
  x = jnp.asarray([[1.0, 1.0], [2.0, 0.0], [0.0, 2.0], [-1.0, -1.0]])[
    None, :, None, :
  ]  # [1, 4, 1, 2]
  means = jnp.asarray([[[1.0, 0.0], [0.0, 1.0]]])  # [H=1, N=2, K=2]
  v = jnp.asarray([[1.0, 0.0], [0.0, 1.0], [3.0, 3.0], [5.0, -5.0]])[None, :, None, :]
  return x, means, v


def _softmax_attend(qi, keys, vals, scale):
  w = np.exp([scale * float(np.dot(qi, kj)) for kj in keys])
  return (w[:, None] * np.asarray(vals)).sum(0) / w.sum()


@pytest.mark.parametrize('causal', [True, False])
def test_hand_built_clusters_average_and_zero(causal):
  x, means, v = _hand_built()
  idx = balanced_assignment(jnp.transpose(x, (0, 2, 1, 3)), means, 2)
  np.testing.assert_array_equal(idx[0, 0], [[0, 1], [0, 2]])
  out, picks = routing_attention(x, x, v, means, window=2, causal=causal)
  np.testing.assert_array_equal(picks[0, 0], [2, 1, 1, 0])
  s = 2**-0.5
  xs, vs = np.asarray(x[0, :, 0]), np.asarray(v[0, :, 0])
  if causal:
    want0 = vs[0]  # in both clusters token 0 sees only itself: the average of v0 and v0
  else:
    want0 = 0.5 * (
      _softmax_attend(xs[0], xs[[0, 1]], vs[[0, 1]], s)
      + _softmax_attend(xs[0], xs[[0, 2]], vs[[0, 2]], s)
    )
  want = np.stack(
    [
      want0,
      _softmax_attend(xs[1], xs[[0, 1]], vs[[0, 1]], s),
      _softmax_attend(xs[2], xs[[0, 2]], vs[[0, 2]], s),
      np.zeros(2),
    ]
  )
  np.testing.assert_allclose(out[0, :, 0], want, rtol=1e-5, atol=1e-6)


def test_values_of_the_future_never_reach_the_past():
  b, l, h, kd, w = 2, 32, 2, 8, 8
  x = normal((b, l, h, kd), 10)
  means = normal((h, l // w, kd), 11)
  v = normal((b, l, h, kd), 12)
  f = jax.jit(lambda v: routing_attention(x, x, v, means, window=w).out_BLHK)
  base = f(v)
  for t in (0, 7, 20, 30):
    changed = f(v.at[:, t + 1 :].add(normal((b, l - t - 1, h, kd), 13 + t)))
    np.testing.assert_array_equal(changed[:, : t + 1], base[:, : t + 1])
    assert not np.allclose(changed[:, t + 1 :], base[:, t + 1 :])


def test_kmeans_stats_and_ema_update_by_hand():
  x = jnp.asarray([[[3.0, 0.0]], [[0.0, 2.0]], [[1.0, 0.0]]])[
    None
  ]  # [1, 3, 1, 2]; token 1 -> mean 1
  means = jnp.asarray([[[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]]])  # [1, 3, 2]; mean 2 gets nothing
  stats = kmeans_stats(x, means)
  np.testing.assert_allclose(stats['count_HN'], [[2.0, 1.0, 0.0]])
  np.testing.assert_allclose(stats['sum_HNK'], [[[4.0, 0.0], [0.0, 2.0], [0.0, 0.0]]])
  ema_sum, ema_count = means, jnp.ones((1, 3))
  new_means, new_sum, new_count = kmeans_ema_update(ema_sum, ema_count, stats, decay=0.9)
  count = 0.9 * np.ones(3) + 0.1 * np.array([2.0, 1.0, 0.0])
  n = count.sum()
  count = (count + 1e-5) / (n + 3e-5) * n
  total = 0.9 * np.asarray(means[0]) + 0.1 * np.array([[4.0, 0.0], [0.0, 2.0], [0.0, 0.0]])
  np.testing.assert_allclose(new_count[0], count, rtol=1e-6)
  np.testing.assert_allclose(new_sum[0], total, rtol=1e-6)
  np.testing.assert_allclose(new_means[0], total / count[:, None], rtol=1e-6)
  # weights drop a token from the statistics
  weighted = kmeans_stats(x, means, jnp.asarray([[1.0, 0.0, 1.0]]))
  np.testing.assert_allclose(weighted['count_HN'], [[2.0, 0.0, 0.0]])


def test_commitment_loss_by_hand_and_its_gradient_reaches_only_x():
  x = jnp.asarray([[[3.0, 0.0]], [[0.0, 2.0]]])[None]
  means = jnp.asarray([[[1.0, 0.0], [0.0, 1.0]]])
  want = np.mean([[(3 - 1) ** 2, 0.0], [0.0, (2 - 1) ** 2]])
  np.testing.assert_allclose(commitment_loss(x, means), want, rtol=1e-6)
  g_x, g_m = jax.grad(commitment_loss, argnums=(0, 1))(x, means)
  np.testing.assert_allclose(g_x[0, :, 0], [[1.0, 0.0], [0.0, 0.5]], rtol=1e-6)
  np.testing.assert_array_equal(g_m, 0.0)


@pytest.mark.parametrize('l,window,g,segments', [(32, 8, 2, True), (30, 8, 1, False)])
def test_local_attention_equals_dense_with_banded_mask(l, window, g, segments):
  """Padding when window does not divide L; GQA groups; packed segments."""
  b, h, kd = 2, 4, 8
  q, k, v = normal((b, l, h, kd), 20), normal((b, l, g, kd), 21), normal((b, l, g, kd), 22)
  seg = jnp.asarray(np.repeat([[0, 1, 2]], b, 0).repeat([l // 3, l // 3, l - 2 * (l // 3)], 1))
  segment_ids = seg if segments else None
  i, j = np.arange(l)[:, None], np.arange(l)[None, :]
  mask = jnp.asarray((j <= i) & (j >= (i // window - 1) * window))[None, None]
  if segments:
    mask = mask & (seg[:, None, :, None] == seg[:, None, None, :])
  want = jax.nn.dot_product_attention(q, k, v, mask=mask, implementation='xla')
  got = jax.jit(
    lambda q, k, v: local_attention(q, k, v, window=window, segment_ids_BL=segment_ids)
  )(q, k, v)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize('causal', [True, pytest.param(False, marks=pytest.mark.slow)])
def test_folded_clusters_equal_the_reference_outputs_gradients_and_picks(causal):
  """Shared-QK clusters folded into the batch axis and run through `jax.nn.dot_product_attention`
  (the flash kernels' call, impl='xla') equal the einsum reference: packed segments, segment-0
  padding (a query that sees no key), multi-picked averaging and unpicked zeros included."""
  b, l, h, kd, n, w = 2, 24, 3, 8, 5, 8  # N·W = 40 > L: some tokens picked twice, some never
  x, v, means = normal((b, l, h, kd), 30), normal((b, l, h, kd), 31), normal((h, n, kd), 32)
  # row 0: 6 valid tokens < W, so every cluster also takes segment-0 queries that see no key
  seg = jnp.asarray([[1] * 3 + [2] * 3 + [0] * 18, [1] * 10 + [2] * 14], jnp.int32)
  cot = normal((b, l, h, kd), 33)

  def run(impl, segment_ids):
    def f(x, v, means):
      return routing_attention(
        x, x, v, means, window=w, causal=causal, scale=0.7, segment_ids_BL=segment_ids, impl=impl
      )

    out = jax.jit(f)(x, v, means)
    grads = jax.jit(jax.grad(lambda *a: jnp.sum(f(*a).out_BLHK * cot), argnums=(0, 1)))(x, v, means)
    return out, grads

  for segment_ids in (None, seg):
    (got, got_grads), (want, want_grads) = run('xla', segment_ids), run(None, segment_ids)
    np.testing.assert_array_equal(got.picks_BHL, want.picks_BHL)
    assert (want.picks_BHL > 1).any() and (want.picks_BHL == 0).any()
    if segment_ids is not None:  # segment-0 queries were picked (and get zeros)
      assert (want.picks_BHL[0][:, segment_ids[0] == 0] > 0).any()
    np.testing.assert_allclose(got.out_BLHK, want.out_BLHK, rtol=1e-5, atol=1e-6)
    for g_got, g_want in zip(got_grads, want_grads):
      np.testing.assert_allclose(g_got, g_want, rtol=1e-5, atol=1e-5)
