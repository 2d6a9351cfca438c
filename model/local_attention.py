"""Blocked causal sliding-window attention: the local heads of a routing-attention layer.

Each block of `window` queries attends to its own block and the previous one (google
`query_shape=(W,)`, `memory_flange=(W,)`), causal on positions, so a query sees between 1 and
2·W - 1 earlier tokens. Time and memory are O(L·W). Grouped-query heads: G kv heads serve H // G
query heads each.
"""

import jax
import jax.numpy as jnp

_MASKED = -1e30


def local_attention(
  q_BLHK: jax.Array,
  k_BLGK: jax.Array,
  v_BLGK: jax.Array,
  *,
  window: int,
  scale: float | None = None,
  segment_ids_BL: jax.Array | None = None,
) -> jax.Array:
  """Causal attention restricted to the current and previous block of `window` positions."""
  b, l, h, kd = q_BLHK.shape
  g = k_BLGK.shape[2]
  scale = kd**-0.5 if scale is None else scale
  pad = -l % window
  nb = (l + pad) // window
  padded = lambda x: jnp.pad(x, ((0, 0), (0, pad)) + ((0, 0),) * (x.ndim - 2))
  q = padded(q_BLHK).reshape(b, nb, window, g, h // g, kd)
  k = padded(k_BLGK).reshape(b, nb, window, g, kd)
  v = padded(v_BLGK).reshape(b, nb, window, g, kd)
  # memory of block i: blocks i-1 and i (block -1 is zeros and fully masked)
  two = lambda x: jnp.concatenate(
    [jnp.pad(x, ((0, 0), (1, 0)) + ((0, 0),) * (x.ndim - 2))[:, :-1], x], axis=2
  )
  k2, v2 = two(k), two(v)
  logits = jnp.einsum('bnqgrk,bnsgk->bngrqs', q, k2, preferred_element_type=jnp.float32) * scale

  pos_NQ = jnp.arange(nb * window).reshape(nb, window)
  pos_NS = jnp.concatenate([pos_NQ - window, pos_NQ], axis=1)
  mask = (pos_NS[:, None, :] <= pos_NQ[:, :, None]) & (pos_NS[:, None, :] >= 0)  # [nb, Q, S]
  mask = mask[None, :, None, None]
  if segment_ids_BL is not None:
    seg = jnp.pad(segment_ids_BL, ((0, 0), (0, pad)), constant_values=-1).reshape(b, nb, window)
    seg2 = two(seg)
    same = seg[:, :, :, None] == seg2[:, :, None, :]  # [B, nb, Q, S]
    mask = mask & same[:, :, None, None]
  probs = jax.nn.softmax(jnp.where(mask, logits, _MASKED), axis=-1)
  out = jnp.einsum(
    'bngrqs,bnsgk->bnqgrk', probs.astype(v.dtype), v2, preferred_element_type=jnp.float32
  )
  return out.reshape(b, nb * window, h, kd)[:, :l].astype(v_BLGK.dtype)
