"""Union of Experts (Yang, Lian, Li 2025; docs/uoe.md): pure functions.

The equivalent decomposition: a dense SwiGLU MLP is E experts, expert e owning hidden units
[e·F/E, (e+1)·F/E) (column blocks of w_gate and w_up, row blocks of w_down), and multi-head attention
is H head-experts (head h owns its Q/K/V columns and its rows of the output projection). Summing every
expert over every token reproduces the dense layer exactly; `mlp_to_experts` / `experts_to_mlp` and
`convert_dense_state` / `convert_uoe_state` move weights between the two layouts.

Routing (static shapes throughout):
- A gate `x @ router_DE` (f32 softmax over the experts) lets each token choose its top-k experts.
- Data selection (`select_tokens`): each expert then takes, per sequence, the top-C tokens by gate
  score among those that chose it, sorted back to time order (the released "patch-wise data
  selection" with the static capacity C = ceil(cap·L·k/E) in place of its data-dependent length).
  Slots beyond the tokens that chose the expert are padding: `valid` is False and their output is
  discarded. The selection compares tokens of the whole sequence, so in a causal LM it reads the
  future (as expert choice does): which tokens an expert takes at time t depends on later tokens.
  Given a fixed selection, the computation itself is causal.
- SMHA (`model.smha`) and UoME-DS (`uome_selected`) run their experts on the selected tokens only.
- UoME-ES (`uome_expert_selection`): in the released code one gate per sequence, reading the whole
  flattened sequence, picks the experts that process all of it; in a causal LM that reads the
  future. Here the gate reads the causal running mean of x (the prefix mean x̄_t = mean(x_0..x_t)),
  so position t's experts depend on x_0..x_t only. That makes it a per-position choice driven by a
  prefix summary, not one choice per sequence: it is executed as token-choice top-k with the MoE
  core's dropless grouped matmul (nothing is dropped, every position gets k experts). The
  per-sequence alternative (choose once from the first position or a prompt prefix, then run those
  experts on the whole sequence) is causal too but fixes the experts from what little the first
  positions say; it is not implemented.

Gate outputs: with `gate_outputs=True` each selected output is multiplied by E·g (g the gate
probability, E the number of experts), so the gate learns and a uniform gate gives weight 1, the
released forward pass. With False the weight is 1: the released code, where the gate is used only
through top-k indices and receives no gradient.

Tokens with segment id 0 (`model.validity`) are invisible: never selected, no capacity slot, left
out of every statistic; a sequence's capacity follows its number of valid tokens. With segment
ids the expert-selection gate's prefix mean restarts at every segment.
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp

from model import moe, router, validity
from model.capacity import capacity

# ----------------------------------------------------------------------------- decomposition


def mlp_to_experts(
  w_gate_DF: jax.Array, w_up_DF: jax.Array, w_down_FD: jax.Array, num_experts: int
) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Dense SwiGLU weights -> E experts: (w_gate_EDf, w_up_EDf, w_down_EfD), f = F / E."""
  d, f = w_gate_DF.shape
  if f % num_experts:
    raise ValueError(f'num_experts={num_experts} must divide the MLP width {f}')
  cols = lambda w_DF: w_DF.reshape(d, num_experts, f // num_experts).transpose(1, 0, 2)
  return cols(w_gate_DF), cols(w_up_DF), w_down_FD.reshape(num_experts, f // num_experts, d)


def experts_to_mlp(
  w_gate_EDf: jax.Array, w_up_EDf: jax.Array, w_down_EfD: jax.Array
) -> tuple[jax.Array, jax.Array, jax.Array]:
  """The inverse of `mlp_to_experts`: (w_gate_DF, w_up_DF, w_down_FD)."""
  e, d, f = w_gate_EDf.shape
  cols = lambda w_EDf: w_EDf.transpose(1, 0, 2).reshape(d, e * f)
  return cols(w_gate_EDf), cols(w_up_EDf), w_down_EfD.reshape(e * f, d)


# ----------------------------------------------------------------------------- routing


class Gate(NamedTuple):
  """A token-level gate: f32 logits and softmax probabilities [B, L, E], each token's top-k [B, L, K]."""

  logits: jax.Array
  probs: jax.Array
  experts: jax.Array


class Selection(NamedTuple):
  """The tokens each expert processes per sequence, [B, E, C] in time order.

  `valid` is False on padding slots (the token did not choose the expert); `weight` multiplies the
  slot's output (E·gate with gate_outputs, else 1; always 0 on padding).
  """

  idx: jax.Array
  valid: jax.Array
  weight: jax.Array


def gate(x_BLD: jax.Array, router_DE: jax.Array, k: int) -> Gate:
  """Softmax gate in f32 and each token's top-k experts."""
  logits_BLE = jnp.einsum('bld,de->ble', x_BLD.astype(jnp.float32), router_DE.astype(jnp.float32))
  probs_BLE = jax.nn.softmax(logits_BLE, axis=-1)
  _, experts_BLK = jax.lax.top_k(probs_BLE, k)
  return Gate(logits_BLE, probs_BLE, experts_BLK.astype(jnp.int32))


def _weight(probs, num_experts: int, gate_outputs: bool):
  return num_experts * probs if gate_outputs else jnp.ones_like(probs)


def select_tokens(
  g: Gate,
  capacity_: int,
  *,
  gate_outputs: bool = True,
  valid_BL: jax.Array | None = None,
  used_capacity_B: jax.Array | None = None,
) -> Selection:
  """Each expert's top-`capacity_` tokens per sequence among those that chose it, in time order.

  Invalid tokens (`valid_BL` False) never count as having chosen; with `used_capacity_B` (traced,
  <= capacity_) an expert keeps only its first `used_capacity_B[b]` picks of sequence b.
  """
  e = g.probs.shape[-1]
  chosen_BEL = jnp.moveaxis((g.experts[..., None] == jnp.arange(e)).any(-2), -1, 1)
  if valid_BL is not None:
    chosen_BEL = chosen_BEL & valid_BL[:, None, :]
  probs_BEL = jnp.moveaxis(g.probs, -1, 1)
  score_BEL = jnp.where(chosen_BEL, jax.lax.stop_gradient(probs_BEL), -1.0)
  _, idx_BEC = jax.lax.top_k(score_BEL, capacity_)
  keep_BEC = jnp.ones(idx_BEC.shape, bool)
  if used_capacity_B is not None:  # top_k's order is the rank: keep the first `used` picks
    keep_BEC = jnp.broadcast_to(
      jnp.arange(capacity_)[None, None, :] < used_capacity_B[:, None, None], idx_BEC.shape
    )
  order_BEC = jnp.argsort(idx_BEC, axis=-1)
  idx_BEC = jnp.take_along_axis(idx_BEC, order_BEC, axis=-1).astype(jnp.int32)
  keep_BEC = jnp.take_along_axis(keep_BEC, order_BEC, axis=-1)
  valid_BEC = jnp.take_along_axis(chosen_BEL, idx_BEC, axis=-1) & keep_BEC
  gate_BEC = jnp.take_along_axis(probs_BEL, idx_BEC, axis=-1)
  weight_BEC = jnp.where(valid_BEC, _weight(gate_BEC, e, gate_outputs), 0.0)
  return Selection(idx_BEC, valid_BEC, weight_BEC)


def full_selection(batch: int, num_experts: int, length: int) -> Selection:
  """Every expert takes every token with weight 1: the selection that reproduces the dense layer."""
  idx_BEC = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (batch, num_experts, length))
  return Selection(idx_BEC, jnp.ones(idx_BEC.shape, bool), jnp.ones(idx_BEC.shape, jnp.float32))


def gather_tokens(x_BL_: jax.Array, idx_BEC: jax.Array) -> jax.Array:
  """x[b, idx[b, e, c]] -> [B, E, C, ...]."""
  return jax.vmap(lambda x_L_, i_EC: x_L_[i_EC])(x_BL_, idx_BEC)


def scatter_tokens(y_BEC_: jax.Array, idx_BEC: jax.Array, length: int) -> jax.Array:
  """Sum of the slots' values into their positions: [B, E, C, ...] -> [B, L, ...]."""

  def one(y_EC_, i_EC):
    flat = y_EC_.reshape(-1, *y_EC_.shape[2:])
    return jnp.zeros((length, *flat.shape[1:]), flat.dtype).at[i_EC.reshape(-1)].add(flat)

  return jax.vmap(one)(y_BEC_, idx_BEC)


def routing_metrics(
  g: Gate, load_E: jax.Array, selected_BL: jax.Array, valid_BL: jax.Array | None = None
) -> dict:
  """Losses and load statistics of one gate over the valid tokens (f32 scalars, unprefixed names).

  `load_E`: share of the (valid) tokens each expert processes; `selected_BL`: how many experts
  process each token. Balance loss and z-loss are the MoE core's (`model.router`), on the token
  choices.
  """
  b, l, e = g.probs.shape
  probs_TE = g.probs.reshape(b * l, e)
  k = g.experts.shape[-1]
  valid_T = None if valid_BL is None else valid_BL.reshape(-1)
  mean = jnp.maximum(load_E.mean(), 1e-9)
  selected_T = selected_BL.reshape(-1).astype(jnp.float32)
  valid_f = jnp.ones_like(selected_T) if valid_T is None else valid_T.astype(jnp.float32)
  choices = k * jnp.maximum(valid_f.sum(), 1.0)
  return {
    'balance_loss': router.balance_loss(probs_TE, g.experts.reshape(b * l, k), valid_T),
    'z_loss': router.z_loss(g.logits.reshape(b * l, e), valid_T),
    'gate_entropy': router.entropy(probs_TE, valid_T),
    'load_cv': load_E.std() / mean,
    'load_min': load_E.min(),
    'load_max': load_E.max(),
    'unselected_fraction': validity.masked_mean((selected_T == 0).astype(jnp.float32), valid_T),
    'dropped_fraction': (choices - jnp.sum(selected_T * valid_f)) / choices,
  }


def selection_metrics(g: Gate, sel: Selection, valid_BL: jax.Array | None = None) -> dict:
  """`routing_metrics` of a data selection (tokens per expert after capacity)."""
  b, l, _ = g.probs.shape
  valid = sel.valid.astype(jnp.float32)
  n = b * l if valid_BL is None else jnp.maximum(valid_BL.sum(), 1).astype(jnp.float32)
  return routing_metrics(g, valid.sum((0, 2)) / n, scatter_tokens(valid, sel.idx, l), valid_BL)


# ----------------------------------------------------------------------------- UoME


def uome_selected(
  x_BLD: jax.Array,
  w_gate_EDf: jax.Array,
  w_up_EDf: jax.Array,
  w_down_EfD: jax.Array,
  sel: Selection,
) -> jax.Array:
  """UoME data selection: expert e's SwiGLU block on its selected tokens, weighted, summed back.

  The experts run as one expert-major batched matmul [E, B·C, D] (as `moe._swiglu_E`): XLA:CPU
  ran the [B, E, C, D] layout at half the speed.
  """
  b, l, d = x_BLD.shape
  e, c = sel.idx.shape[1:]
  x_ETD = jnp.moveaxis(gather_tokens(x_BLD, sel.idx), 1, 0).reshape(e, b * c, d)
  h_ETf = jax.nn.silu(jnp.einsum('etd,edf->etf', x_ETD, w_gate_EDf)) * jnp.einsum(
    'etd,edf->etf', x_ETD, w_up_EDf
  )
  y_ETD = jnp.einsum('etf,efd->etd', h_ETf, w_down_EfD)
  y_BECD = jnp.moveaxis(y_ETD.reshape(e, b, c, d), 0, 1).astype(jnp.float32)
  y_BECD = y_BECD * sel.weight[..., None]
  return scatter_tokens(y_BECD, sel.idx, l).astype(x_BLD.dtype)


def select_valid(
  g: Gate, per_token: int, factor: float, valid_BL: jax.Array | None, *, gate_outputs: bool = True
) -> Selection:
  """`select_tokens` with C = `capacity(L, ...)` slots, of which each sequence uses as many as its
  valid tokens alone would get: a padded prefix selects what the prefix selects alone."""
  b, l, e = g.probs.shape
  formula = lambda n: capacity(n, per_token, e, factor)
  used_B = None
  if valid_BL is not None:
    used_B = validity.slots_for(formula, valid_BL.sum(-1), l)
  return select_tokens(
    g, formula(l), gate_outputs=gate_outputs, valid_BL=valid_BL, used_capacity_B=used_B
  )


def uome(
  x_BLD: jax.Array,
  router_DE: jax.Array,
  w_gate_EDf: jax.Array,
  w_up_EDf: jax.Array,
  w_down_EfD: jax.Array,
  *,
  k: int,
  capacity_factor: float = 1.0,
  gate_outputs: bool = True,
  valid_BL: jax.Array | None = None,
) -> tuple[jax.Array, Gate, Selection]:
  """UoME data selection end to end: gate, per-expert token selection, experts. (y, gate, sel)."""
  g = gate(x_BLD, router_DE, k)
  sel = select_valid(g, k, capacity_factor, valid_BL, gate_outputs=gate_outputs)
  return uome_selected(x_BLD, w_gate_EDf, w_up_EDf, w_down_EfD, sel), g, sel


def prefix_mean(x_BLD: jax.Array, segment_ids_BL: jax.Array | None = None) -> jax.Array:
  """Causal running mean in f32: out[:, t] = mean(x[:, s:t + 1]), s the start of t's segment
  (0 without segment ids); a segment's means never read another segment."""
  x32 = x_BLD.astype(jnp.float32)
  if segment_ids_BL is None:
    counts_L = jnp.arange(1, x_BLD.shape[1] + 1, dtype=jnp.float32)
    return jnp.cumsum(x32, axis=1) / counts_L[None, :, None]
  ones_BL = jnp.ones(segment_ids_BL.shape, jnp.float32)
  counts_BL = validity.segment_cumsum(ones_BL, segment_ids_BL)
  return validity.segment_cumsum(x32, segment_ids_BL) / counts_BL[..., None]


def uome_expert_selection(
  x_BLD: jax.Array,
  router_DE: jax.Array,
  w_gate_EDf: jax.Array,
  w_up_EDf: jax.Array,
  w_down_EfD: jax.Array,
  *,
  k: int,
  gate_outputs: bool = True,
  impl: str = 'auto',
  block_size: int = 0,
  segment_ids_BL: jax.Array | None = None,
) -> tuple[jax.Array, Gate]:
  """UoME expert selection for a causal LM: the gate reads the prefix mean (of the token's
  segment), so position t's k experts depend on x_0..x_t only; executed dropless by the MoE core
  (`moe.experts_dropless`)."""
  b, l, d = x_BLD.shape
  e = router_DE.shape[-1]
  g = gate(prefix_mean(x_BLD, segment_ids_BL), router_DE, k)
  weights_TK = _weight(jnp.take_along_axis(g.probs, g.experts, axis=-1), e, gate_outputs)
  y_TD = moe.experts_dropless(
    x_BLD.reshape(b * l, d),
    weights_TK.reshape(b * l, k),
    g.experts.reshape(b * l, k),
    w_gate_EDf,
    w_up_EDf,
    w_down_EfD,
    impl=impl,
    block_size=block_size,
  )
  return y_TD.reshape(b, l, d), g


def expert_selection_metrics(g: Gate, valid_BL: jax.Array | None = None) -> dict:
  """`routing_metrics` of expert selection: every (valid) position gets its k experts."""
  b, l, e = g.probs.shape
  k = g.experts.shape[-1]
  valid_BL = jnp.ones((b, l), bool) if valid_BL is None else valid_BL
  hot_BLE = jax.nn.one_hot(g.experts, e, dtype=jnp.float32).sum(2) * valid_BL[..., None]
  load_E = hot_BLE.sum((0, 1)) / jnp.maximum(valid_BL.sum(), 1).astype(jnp.float32)
  return routing_metrics(g, load_E, jnp.full((b, l), k, jnp.int32), valid_BL)
