"""Block-causal softmax attention in plain XLA: each query chunk is scored against its key prefix.

The causal score matrix is lower-triangular, and the 'xla' reference (`jax.nn.dot_product_attention`)
computes all of it and then masks the upper half away. Here the queries are cut into chunks of C
rows, and chunk i is scored against keys [0, (i+1)·C) only. The softmax of each row is the
reference's: a masked key adds exp(large negative) = 0 to the reference's sum, so only the order of
the summation differs. The work drops to (n+1)/2n of the full matrix for n chunks.

`attention.impl='chunked'` selects it, and 'auto' resolves to it on CPU. There, attention is bound by
the elementwise passes over the score matrix (mask, softmax and their backward) rather than by its
matmuls. docs/performance.md has the measurements.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np

_ROWS = 32  # chunk sizes are multiples of this
_CHUNKS = 4
_MIN_CHUNK = 64
_MAX_CHUNK = 512


def chunk_size(length: int) -> int:
  """Query rows per chunk: length / 4 rounded up to a multiple of 32, within [64, 512].

  Measured on 2 CPU cores (docs/performance.md). Attention alone, forward and backward, at length
  256 (head dim 32): chunks of 32 and 64 take 0.42x and 0.44x the reference's time, 16 take 0.61x.
  At length 512 (head dim 64): 64 takes 0.46x, 32 takes 0.64x. In the whole demo train step, where
  each chunk's key slices and their gradients' padding cost extra copies, 64 (4 chunks) beat 32
  and 128, hence the floor of 64: sequences up to 64 are one chunk. Lengths above 512 are not
  measured; there the cap keeps chunks at 512 rows.
  """
  rows = math.ceil(length / _CHUNKS / _ROWS) * _ROWS
  return min(_MAX_CHUNK, max(_MIN_CHUNK, rows))


def scored_pairs(length: int, chunk: int | None = None) -> int:
  """(query, key) pairs scored per head and row: Σ over chunks of rows · keys of the prefix."""
  chunk = chunk_size(length) if chunk is None else chunk
  return sum(
    (min(start + chunk, length) - start) * min(start + chunk, length)
    for start in range(0, length, chunk)
  )


def _precision(dtype):
  """`jax.nn.dot_product_attention`'s choice: half-precision inputs accumulate in f32."""
  if dtype == jnp.bfloat16:
    return jax.lax.DotAlgorithmPreset.BF16_BF16_F32
  if dtype == jnp.float16:
    return jax.lax.DotAlgorithmPreset.F16_F16_F32
  return None


def causal_attention(
  q_BLHK: jax.Array,
  k_BLGK: jax.Array,
  v_BLGK: jax.Array,
  *,
  segment_ids_BL: jax.Array | None = None,
  scale: float | None = None,
  chunk: int | None = None,
) -> jax.Array:
  """Causal attention (G kv heads serve H // G query heads each), softmax in f32, in chunks.

  With `segment_ids_BL`, a query sees only the earlier keys of its own segment. The reference's
  dtype rules are kept: scores are accumulated in f32, probabilities cast to v's dtype.
  """
  b, length, h, kd = q_BLHK.shape
  g = k_BLGK.shape[2]
  scale = kd**-0.5 if scale is None else scale
  chunk = chunk_size(length) if chunk is None else chunk
  precision = _precision(q_BLHK.dtype)
  logits_dtype = jnp.promote_types(q_BLHK.dtype, jnp.float32)
  negative = jnp.asarray(0.7 * jnp.finfo(jnp.float32).min, logits_dtype)
  q_BLGRK = q_BLHK.reshape(b, length, g, h // g, kd)
  outs = []
  for start in range(0, length, chunk):
    end = min(start + chunk, length)
    s_BGRCP = jnp.einsum(
      'bcgrk,bpgk->bgrcp',
      q_BLGRK[:, start:end],
      k_BLGK[:, :end],
      precision=precision,
      preferred_element_type=logits_dtype,
    )
    s_BGRCP = s_BGRCP * jnp.asarray(scale, logits_dtype)
    keep_CP = np.arange(end)[None, :] <= np.arange(start, end)[:, None]
    keep = jnp.asarray(keep_CP)[None, None, None]
    if segment_ids_BL is not None:
      same_BCP = segment_ids_BL[:, start:end, None] == segment_ids_BL[:, None, :end]
      keep = keep & same_BCP[:, None, None]
    s_BGRCP = jnp.where(keep, s_BGRCP, negative)
    p_BGRCP = jax.nn.softmax(s_BGRCP.astype(jnp.float32), axis=-1).astype(v_BLGK.dtype)
    outs.append(jnp.einsum('bgrcp,bpgk->bcgrk', p_BGRCP, v_BLGK[:, :end]))
  return jnp.concatenate(outs, axis=1).reshape(b, length, h, kd)
