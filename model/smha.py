"""Selective Multi-Head Attention (SMHA), the attention half of Union of Experts (docs/uoe.md).

Heads are experts. A per-token gate over the H heads lets each token choose `heads_per_token` heads
(`uoe.gate`); each head then takes, per sequence, a static capacity of the tokens that chose it
(`uoe.select_tokens`: top by gate score, sorted back to time order) and attends among them only:
its queries, keys and values are projected from the selected tokens (head h's columns of wq, and of
wk/wv for its kv head h // (H/G)), RoPE uses the tokens' ORIGINAL positions and the causal mask
compares their original time indices (the released code used rank positions 0..C-1). Each head's
output goes through its rows of wo, is multiplied by the slot weight (E·gate with
`gate_outputs`, else 1) and scattered back; a token no head selected gets zeros (only its residual).

With every head selected, capacity L and weight 1 (`uoe.full_selection`), `smha_selected` equals
dense causal multi-head attention with the same weights.
"""

import jax
import jax.numpy as jnp

from model.layers import apply_rope
from model.uoe import Gate, Selection, gate, gather_tokens, scatter_tokens, select_valid

_MASKED = -1e30  # finite: a padding query with no visible key gets a uniform row, then weight 0


def _rope_BHC(x_BHCK: jax.Array, positions_BHC: jax.Array, theta: float) -> jax.Array:
  b, h, c, k = x_BHCK.shape
  out = apply_rope(x_BHCK.reshape(b * h, c, 1, k), positions_BHC.reshape(b * h, c), theta)
  return out.reshape(b, h, c, k)


def smha_selected(
  x_BLD: jax.Array,
  wq_DHK: jax.Array,
  wk_DGK: jax.Array,
  wv_DGK: jax.Array,
  wo_HKD: jax.Array,
  positions_BL: jax.Array,
  sel: Selection,
  *,
  rope_theta: float = 10000.0,
  segment_ids_BL: jax.Array | None = None,
) -> jax.Array:
  """Attention of each head among its selected tokens `sel` ([B, H, C]); returns y_BLD.

  Softmax in f32, scale K**-0.5. Causal given `sel`: a slot sees only slots of earlier or equal
  original time index (and, with `segment_ids_BL`, of its own segment).
  """
  b, l, _ = x_BLD.shape
  h, kd = wq_DHK.shape[1:]
  group = h // wk_DGK.shape[1]
  x_BHCD = gather_tokens(x_BLD, sel.idx)
  q_BHCK = jnp.einsum('bhcd,dhk->bhck', x_BHCD, wq_DHK)
  k_BHCK = jnp.einsum('bhcd,dhk->bhck', x_BHCD, jnp.repeat(wk_DGK, group, axis=1))
  v_BHCK = jnp.einsum('bhcd,dhk->bhck', x_BHCD, jnp.repeat(wv_DGK, group, axis=1))
  positions_BHC = gather_tokens(positions_BL, sel.idx)
  q_BHCK = _rope_BHC(q_BHCK, positions_BHC, rope_theta)
  k_BHCK = _rope_BHC(k_BHCK, positions_BHC, rope_theta)
  logits_BHCC = (
    jnp.einsum('bhik,bhjk->bhij', q_BHCK, k_BHCK, preferred_element_type=jnp.float32) * kd**-0.5
  )
  mask_BHCC = (sel.idx[..., :, None] >= sel.idx[..., None, :]) & sel.valid[..., None, :]
  if segment_ids_BL is not None:
    seg_BHC = gather_tokens(segment_ids_BL, sel.idx)
    mask_BHCC = mask_BHCC & (seg_BHC[..., :, None] == seg_BHC[..., None, :])
  probs_BHCC = jax.nn.softmax(jnp.where(mask_BHCC, logits_BHCC, _MASKED), axis=-1)
  o_BHCK = jnp.einsum('bhij,bhjk->bhik', probs_BHCC.astype(v_BHCK.dtype), v_BHCK)
  y_BHCD = jnp.einsum('bhck,hkd->bhcd', o_BHCK, wo_HKD).astype(jnp.float32)
  y_BHCD = y_BHCD * sel.weight[..., None]
  return scatter_tokens(y_BHCD, sel.idx, l).astype(x_BLD.dtype)


def smha(
  x_BLD: jax.Array,
  router_DH: jax.Array,
  wq_DHK: jax.Array,
  wk_DGK: jax.Array,
  wv_DGK: jax.Array,
  wo_HKD: jax.Array,
  positions_BL: jax.Array,
  *,
  heads_per_token: int,
  capacity_factor: float = 1.0,
  gate_outputs: bool = True,
  rope_theta: float = 10000.0,
  segment_ids_BL: jax.Array | None = None,
) -> tuple[jax.Array, Gate, Selection]:
  """SMHA end to end: gate, per-head token selection (C = ceil(cap·L·heads_per_token/H), of which
  a sequence uses what its valid tokens alone would get; segment id 0 is never selected),
  attention among the selected tokens. Returns (y_BLD, gate, selection)."""
  g = gate(x_BLD, router_DH, heads_per_token)
  valid_BL = None if segment_ids_BL is None else segment_ids_BL != 0
  sel = select_valid(g, heads_per_token, capacity_factor, valid_BL, gate_outputs=gate_outputs)
  y_BLD = smha_selected(
    x_BLD,
    wq_DHK,
    wk_DGK,
    wv_DGK,
    wo_HKD,
    positions_BL,
    sel,
    rope_theta=rope_theta,
    segment_ids_BL=segment_ids_BL,
  )
  return y_BLD, g, sel
