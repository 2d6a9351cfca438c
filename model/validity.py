"""Which tokens are there: the validity mask that every routed layer honours.

A row may hold tokens that must be invisible to the others: padding, and, in exact-prefix
evaluation and sampling, every position after the prefix being scored. The model marks them with
segment id 0 in `segment_ids_BL` (the packing convention: documents are 1, 2, ...; `None` means
one document filling the row). An invisible token is never selected by a cluster, an expert or a
UoE gate, takes no capacity slot, and is left out of every statistic (k-means, commitment loss,
expert counts, balance and z-losses, entropies). The contract, tested for every experiment config
(`eval.causality`): the logits of a prefix padded with segment id 0 equal those of the prefix run
alone. docs/causality.md explains which mechanisms need it and why.
"""

from collections.abc import Callable

import jax
import jax.numpy as jnp


def valid_tokens(segment_ids_BL: jax.Array | None, batch: int, length: int) -> jax.Array:
  """[B, L] bool: True where a token is there (segment id != 0; everywhere without ids)."""
  if segment_ids_BL is None:
    return jnp.ones((batch, length), bool)
  return segment_ids_BL != 0


def masked_mean(x_T: jax.Array, valid_T: jax.Array | None, axis: int = 0) -> jax.Array:
  """Mean of x over the valid entries of `axis` (all entries when `valid_T` is None), in f32."""
  x_T = x_T.astype(jnp.float32)
  if valid_T is None:
    return jnp.mean(x_T, axis=axis)
  shape = [1] * x_T.ndim
  shape[axis % x_T.ndim] = -1
  w = valid_T.astype(jnp.float32).reshape(shape)
  return jnp.sum(x_T * w, axis=axis) / jnp.maximum(jnp.sum(valid_T.astype(jnp.float32)), 1.0)


def slots_for(formula: Callable[[int], int], count: jax.Array, length: int) -> jax.Array:
  """`formula(count)` for a traced count of valid tokens (0..length), by a lookup table.

  Capacities must follow the number of tokens actually there (a prefix of t tokens gets the slots
  it would get run alone), yet shapes stay static at `formula(length)`. The table evaluates the
  very same Python formula, so padded and unpadded runs agree to the integer.
  """
  table = jnp.asarray([formula(n) for n in range(length + 1)], jnp.int32)
  return table[jnp.clip(count, 0, length)]


def segment_cumsum(x_BL_: jax.Array, segment_ids_BL: jax.Array) -> jax.Array:
  """Running sum along L that restarts where the segment id changes.

  An associative scan whose combine drops the left operand at a segment start, so a segment's
  sums are computed from its own values alone: bitwise independent of every other segment.
  """
  b, l = segment_ids_BL.shape
  start_BL = jnp.concatenate(
    [jnp.ones((b, 1), bool), segment_ids_BL[:, 1:] != segment_ids_BL[:, :-1]], axis=1
  )
  start = start_BL.reshape(b, l, *([1] * (x_BL_.ndim - 2)))

  def combine(left, right):
    (sum_l, start_l), (sum_r, start_r) = left, right
    return jnp.where(start_r, sum_r, sum_l + sum_r), start_l | start_r

  return jax.lax.associative_scan(combine, (x_BL_, jnp.broadcast_to(start, x_BL_.shape)), axis=1)[0]
