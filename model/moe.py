"""SwiGLU experts executed three ways: reference, dropless (sort + grouped matmul), capacity.

All take `x_TD`, the router's `weights_TK, experts_TK` and stacked expert weights
`w_gate_EDF, w_up_EDF, w_down_EFD`; expert e computes `(silu(x @ w_gate[e]) * (x @ w_up[e])) @ w_down[e]`.
- `experts_reference`: every expert on every token (E times the work); the definition.
- `experts_dropless`: assignments sorted by expert, a grouped matmul over the groups, unsorted by
  the inverse permutation. The grouped matmul is chosen by `impl` (`moe.gmm_impl`, model/gmm.py):
  'scan' pads the groups to blocks of `block_size` rows (MegaBlocks-style) and a scan multiplies
  each block by its expert's weights (only routed work plus < E blocks of padding; the CPU
  fallback: XLA:CPU runs ragged_dot densely over every group, measured 10x the dense time at E=8,
  k=2); 'ragged_dot', 'megablox', 'mgpu', 'tokamax' are plain grouped-matmul kernels, and 'blas'
  (the CPU default for float32) runs the experts' whole SwiGLU in one host call each way.
  Row permutations are gathers in both directions (`_take_rows`): no scatter-add in the backward.
- `experts_capacity`: GShard/Switch one-hot dispatch and combine einsums with
  C = ceil(capacity_factor * T * K / E) slots per expert; first choices take slots before second
  choices; overflow is dropped and counted (`capacity_kept` says which assignments ran).
"""

import functools

import jax
import jax.numpy as jnp

from model import axes, gmm, validity
from model.capacity import capacity


def _swiglu_E(x_ECD, w_gate_EDF, w_up_EDF, w_down_EFD):
  """Expert e's SwiGLU on its rows x_ECD[e]."""
  h_ECF = jax.nn.silu(jnp.einsum('ecd,edf->ecf', x_ECD, w_gate_EDF)) * jnp.einsum(
    'ecd,edf->ecf', x_ECD, w_up_EDF
  )
  return jnp.einsum('ecf,efd->ecd', h_ECF, w_down_EFD)


def experts_reference(x_TD, weights_TK, experts_TK, w_gate_EDF, w_up_EDF, w_down_EFD):
  """Every expert on every token, combined with the weights of the selected experts."""
  e = w_gate_EDF.shape[0]
  y_ETD = _swiglu_E(jnp.broadcast_to(x_TD, (e, *x_TD.shape)), w_gate_EDF, w_up_EDF, w_down_EFD)
  combine_TE = jnp.einsum(
    'tk,tke->te', weights_TK.astype(x_TD.dtype), jax.nn.one_hot(experts_TK, e, dtype=x_TD.dtype)
  )
  return jnp.einsum('etd,te->td', y_ETD, combine_TE)


@jax.custom_vjp
def _take_rows(x_ND, src_M, inv_N):
  """out[m] = x[src[m]] (zero where src[m] is out of range). `inv` is the inverse injection
  (src[inv[n]] == n, out of range where row n is never taken); the backward is a gather by it."""
  return jnp.take(x_ND, src_M, axis=0, mode='fill', fill_value=0)


def _take_rows_fwd(x_ND, src_M, inv_N):
  return _take_rows(x_ND, src_M, inv_N), (src_M, inv_N)


def _take_rows_bwd(res, g_MD):
  src_M, inv_N = res
  return jnp.take(g_MD, inv_N, axis=0, mode='fill', fill_value=0), None, None


_take_rows.defvjp(_take_rows_fwd, _take_rows_bwd)


def _combine(out_AD, weights_TK):
  t, k = weights_TK.shape
  return jnp.einsum('tkd,tk->td', out_AD.reshape(t, k, -1), weights_TK.astype(out_AD.dtype))


def _sort(experts_TK, num_experts):
  """Assignment order by expert (stable), its inverse, and the group sizes."""
  experts_A = experts_TK.reshape(-1)
  order_A = jnp.argsort(experts_A, stable=True).astype(jnp.int32)
  rank_A = jnp.zeros_like(order_A).at[order_A].set(jnp.arange(order_A.size, dtype=jnp.int32))
  sizes_E = jnp.bincount(experts_A, length=num_experts).astype(jnp.int32)
  return experts_A, order_A, rank_A, sizes_E


def experts_dropless(
  x_TD,
  weights_TK,
  experts_TK,
  w_gate_EDF,
  w_up_EDF,
  w_down_EFD,
  *,
  impl: str = 'auto',
  block_size: int = 0,
  interpret: bool = False,
):
  """Every assignment computed exactly once: sort, grouped matmul, unsort, combine.
  `impl` names the kernel (model/gmm.py; refused when it cannot run here); `block_size` the rows
  per block of 'scan' (0: `block_rows` picks); `interpret` runs the Pallas kernels in interpret
  mode (CPU tests)."""
  kernel = gmm.resolve(impl, interpret=interpret, dtype=x_TD.dtype)
  args = (x_TD, weights_TK, experts_TK, w_gate_EDF, w_up_EDF, w_down_EFD)
  ragged = functools.partial(_dropless_ragged, kernel=kernel, interpret=interpret)
  if kernel in gmm.UNPARTITIONED:  # XLA cannot partition them: each device sorts its own tokens
    token, whole = ('batch', None), (None, None, None)
    return axes.shard_call(ragged, *args, names=(token,) * 3 + (whole,) * 3)
  if kernel != 'scan':
    return ragged(*args)
  e = w_gate_EDF.shape[0]
  x_AD = jnp.repeat(x_TD, experts_TK.shape[1], axis=0)  # row t*K + j is token t's j-th assignment
  experts_A, _, rank_A, sizes_E = _sort(experts_TK, e)
  b = block_rows(x_AD.shape[0], e, block_size)
  return _combine(
    _blocked(x_AD, experts_A, rank_A, sizes_E, w_gate_EDF, w_up_EDF, w_down_EFD, b), weights_TK
  )


def _dropless_ragged(
  x_TD, weights_TK, experts_TK, w_gate_EDF, w_up_EDF, w_down_EFD, kernel, interpret
):
  """Dropless through a plain grouped-matmul kernel: sort, the experts' SwiGLU on the sorted rows
  (`gmm.ragged_swiglu`: three ragged matmuls, or one fused host call for 'blas'), unsort."""
  k = experts_TK.shape[1]
  x_AD = jnp.repeat(x_TD, k, axis=0)
  _, order_A, rank_A, sizes_E = _sort(experts_TK, w_gate_EDF.shape[0])
  xs_AD = _take_rows(x_AD, order_A, rank_A)
  ys_AD = gmm.ragged_swiglu(kernel, xs_AD, w_gate_EDF, w_up_EDF, w_down_EFD, sizes_E, interpret)
  return _combine(_take_rows(ys_AD, rank_A, order_A), weights_TK)


def block_rows(assignments: int, num_experts: int, block_size: int) -> int:
  """Rows per block of the 'scan' kernel: `block_size`, or with 0 (auto) 256, or 128 where that is
  more than half the mean rows per expert.

  Each expert's last block is half padding on average, so smaller blocks waste fewer rows, and
  larger ones multiply faster. The rule fits these measurements on 2 x86 CPU cores (glibc's large
  blocks on huge pages; docs/performance.md, docs/moe.md):
  - width 128, 1024 rows per expert: 256 took 0.87-0.93x the train step of 512 with XLA's YNNPACK
    dots; with Eigen dots (the CPU default) 256, 384 and 512 took the same time (the layer alone);
  - width 256, 512 rows per expert, the layer alone: Eigen dots 256 took 0.92x the time of 128
    (512 the same as 256), YNNPACK dots 128 and 256 the same;
  - width 512, 2048 rows per expert: 256 beat 128 and 512 (the layer alone).
  """
  if block_size:
    return block_size
  return 256 if assignments // num_experts >= 512 else 128


def _blocked(x_AD, experts_A, rank_A, sizes_E, w_gate_EDF, w_up_EDF, w_down_EFD, b):
  """Groups padded to multiples of b rows; block n is multiplied by its expert's weights only."""
  a, e = x_AD.shape[0], sizes_E.shape[0]
  num_blocks = max(1, (a + e * (b - 1)) // b)  # sum_e ceil(size_e / b) never exceeds this
  padded_E = (sizes_E + b - 1) // b * b
  start_E = jnp.cumsum(sizes_E) - sizes_E
  pend_E = jnp.cumsum(padded_E)
  dst_A = (pend_E - padded_E)[experts_A] + rank_A - start_E[experts_A]  # padded row of each
  src_P = jnp.full((num_blocks * b,), a, jnp.int32).at[dst_A].set(jnp.arange(a, dtype=jnp.int32))
  block_N = jnp.arange(num_blocks, dtype=jnp.int32) * b
  expert_N = jnp.minimum(jnp.searchsorted(pend_E, block_N, side='right'), e - 1).astype(jnp.int32)
  used_N = block_N < pend_E[-1]
  xp_NBD = _take_rows(x_AD, src_P, dst_A).reshape(num_blocks, b, -1)
  yp_NBD = _block_swiglu(xp_NBD, expert_N, used_N, w_gate_EDF, w_up_EDF, w_down_EFD)
  return _take_rows(yp_NBD.reshape(num_blocks * b, -1), dst_A, src_P)


def _w(w_EXY, e):
  return jax.lax.dynamic_index_in_dim(w_EXY, e, keepdims=False)


def _block_swiglu(x_NBD, expert_N, used_N, w_gate_EDF, w_up_EDF, w_down_EFD):
  """Block n's rows through expert expert_N[n]'s SwiGLU (zeros where not used_N[n]).

  Gate and up projections are one matmul per block against [w_gate | w_up] (2F columns).
  """
  w_gu_EDG = jnp.concatenate([w_gate_EDF, w_up_EDF], axis=-1)
  return _block_swiglu_gu(x_NBD, expert_N, used_N, w_gu_EDG, w_down_EFD)


@jax.custom_vjp
def _block_swiglu_gu(x_NBD, expert_N, used_N, w_gu_EDG, w_down_EFD):
  """A scan over blocks with hand-written backward: autodiff of the scan ran ~1.5x slower on CPU
  (weight-gradient carries copied per block); here each block adds its weight gradients in place.
  """
  return _block_fwd(x_NBD, expert_N, used_N, w_gu_EDG, w_down_EFD)[0]


def _block_fwd(x_NBD, expert_N, used_N, w_gu_EDG, w_down_EFD):
  f = w_down_EFD.shape[1]

  def compute(x_BD, e):
    gu_BG = x_BD @ _w(w_gu_EDG, e)
    return (jax.nn.silu(gu_BG[:, :f]) * gu_BG[:, f:]) @ _w(w_down_EFD, e), gu_BG

  def skip(x_BD, e):
    return jnp.zeros_like(x_BD), jnp.zeros((x_BD.shape[0], 2 * f), x_BD.dtype)

  def body(_, inputs):
    x_BD, e, used = inputs
    return None, jax.lax.cond(used, compute, skip, x_BD, e)

  _, (y_NBD, gu_NBG) = jax.lax.scan(body, None, (x_NBD, expert_N, used_N))
  return y_NBD, (x_NBD, expert_N, used_N, w_gu_EDG, w_down_EFD, gu_NBG)


def _block_bwd(res, dy_NBD):
  x_NBD, expert_N, used_N, w_gu_EDG, w_down_EFD, gu_NBG = res
  f = w_down_EFD.shape[1]

  def grads(x_BD, e, gu_BG, dy_BD):
    g_BF, u_BF = gu_BG[:, :f], gu_BG[:, f:]
    sig_BF = jax.nn.sigmoid(g_BF)
    silu_BF = g_BF * sig_BF
    dh_BF = dy_BD @ _w(w_down_EFD, e).T
    du_BF = dh_BF * silu_BF
    dg_BF = dh_BF * u_BF * (sig_BF * (1 + g_BF * (1 - sig_BF)))
    dgu_BG = jnp.concatenate([dg_BF, du_BF], axis=-1)
    return dgu_BG @ _w(w_gu_EDG, e).T, x_BD.T @ dgu_BG, (silu_BF * u_BF).T @ dy_BD

  def skip(x_BD, e, gu_BG, dy_BD):
    return jnp.zeros_like(x_BD), jnp.zeros_like(w_gu_EDG[0]), jnp.zeros_like(w_down_EFD[0])

  def body(acc, inputs):
    e, used = inputs[1], inputs[2]
    dx_BD, *dw = jax.lax.cond(used, grads, skip, inputs[0], e, *inputs[3:])
    add = lambda acc_EXY, d_XY: jax.lax.dynamic_update_index_in_dim(
      acc_EXY, _w(acc_EXY, e) + d_XY.astype(acc_EXY.dtype), e, 0
    )
    return tuple(map(add, acc, dw)), dx_BD

  zeros = tuple(jnp.zeros_like(w) for w in (w_gu_EDG, w_down_EFD))
  dw, dx_NBD = jax.lax.scan(body, zeros, (x_NBD, expert_N, used_N, gu_NBG, dy_NBD))
  return (dx_NBD, None, None, *dw)


_block_swiglu_gu.defvjp(_block_fwd, _block_bwd)


def _capacity_slots(
  experts_TK, num_experts: int, capacity_factor: float, num_groups: int, valid_T=None
):
  """Expert one-hot [G, K, S, E], slot [G, K, S] and kept mask [G, K, S] of every assignment, and C.

  Slots are given in order: all first choices of a group, then all second choices, ... Invalid
  tokens (`valid_T` False) take no slot and are never kept; a group's slots per expert follow its
  number of valid tokens (what the valid tokens alone would get), within the static C.
  """
  (t, k), e, g = experts_TK.shape, num_experts, num_groups
  s = t // g
  formula = lambda n: capacity(n, k, e, capacity_factor)  # model.capacity: checks the factor
  c = formula(s)
  mask_GKSE = jax.nn.one_hot(experts_TK.reshape(g, s, k).transpose(0, 2, 1), e, dtype=jnp.int32)
  valid_GS = jnp.ones((g, s), bool) if valid_T is None else valid_T.reshape(g, s)
  mask_GKSE = mask_GKSE * valid_GS[:, None, :, None]
  pos_GKSE = jnp.cumsum(mask_GKSE.reshape(g, k * s, e), axis=1).reshape(g, k, s, e) - 1
  pos_GKS = jnp.sum(pos_GKSE * mask_GKSE, axis=-1)
  used_G = c if valid_T is None else validity.slots_for(formula, valid_GS.sum(-1), s)[:, None, None]
  keep_GKS = (pos_GKS < used_G) & valid_GS[:, None, :]
  return mask_GKSE, pos_GKS, keep_GKS, c


def capacity_kept(
  experts_TK, num_experts: int, capacity_factor: float, *, num_groups: int = 1, valid_T=None
) -> jax.Array:
  """[T, K] bool: which assignments `experts_capacity` runs (False = dropped for lack of slots)."""
  t, k = experts_TK.shape
  keep_GKS = _capacity_slots(experts_TK, num_experts, capacity_factor, num_groups, valid_T)[2]
  return keep_GKS.transpose(0, 2, 1).reshape(t, k)


def experts_capacity(
  x_TD,
  weights_TK,
  experts_TK,
  w_gate_EDF,
  w_up_EDF,
  w_down_EFD,
  capacity_factor: float,
  *,
  num_groups: int = 1,
  valid_T=None,
):
  """Dispatch/combine einsums with C slots per expert; returns (y_TD, dropped_fraction).

  With `num_groups` G, the T tokens are G consecutive groups (e.g. sequences), each with its own
  C = `model.capacity.capacity(T / G, K, E, capacity_factor)` slots per expert (GShard's groups). Invalid tokens
  (`valid_T` False) take no slot and get zeros; the dropped fraction counts valid assignments.
  """
  (t, k), e, g = experts_TK.shape, w_gate_EDF.shape[0], num_groups
  s = t // g
  mask_GKSE, pos_GKS, keep_GKS, c = _capacity_slots(experts_TK, e, capacity_factor, g, valid_T)
  slot_GKSC = jax.nn.one_hot(jnp.where(keep_GKS, pos_GKS, c), c, dtype=x_TD.dtype)
  dispatch_GKSEC = mask_GKSE.astype(x_TD.dtype)[..., None] * slot_GKSC[..., None, :]
  weights_GKS = weights_TK.reshape(g, s, k).transpose(0, 2, 1).astype(x_TD.dtype)
  combine_GSEC = jnp.einsum('gksec,gks->gsec', dispatch_GKSEC, weights_GKS)
  x_GSD = x_TD.reshape(g, s, -1)
  names = ('act_expert', 'batch', None, 'act_embed')  # experts split over the expert axis
  x_EGCD = axes.constrain(jnp.einsum('gsec,gsd->egcd', dispatch_GKSEC.sum(1), x_GSD), names)
  y_EGCD = _swiglu_E(x_EGCD.reshape(e, g * c, -1), w_gate_EDF, w_up_EDF, w_down_EFD)
  y_EGCD = axes.constrain(y_EGCD.reshape(e, g, c, -1), names)
  y_GSD = jnp.einsum('gsec,egcd->gsd', combine_GSEC, y_EGCD)
  valid_A = (
    None
    if valid_T is None
    else jnp.broadcast_to(valid_T.reshape(g, 1, s), keep_GKS.shape).reshape(-1)
  )
  dropped = 1.0 - validity.masked_mean(keep_GKS.reshape(-1), valid_A)
  return y_GSD.reshape(t, -1), dropped


def experts_choice(x_TD, weights_EC, tokens_EC, w_gate_EDF, w_up_EDF, w_down_EFD):
  """Expert choice execution: expert e processes the tokens tokens_EC[e], outputs weighted back."""
  x_ECD = jnp.take(x_TD, tokens_EC, axis=0)
  y_ECD = _swiglu_E(x_ECD, w_gate_EDF, w_up_EDF, w_down_EFD)
  y_ECD = y_ECD * weights_EC[..., None].astype(y_ECD.dtype)
  return jnp.zeros_like(x_TD).at[tokens_EC.reshape(-1)].add(y_ECD.reshape(-1, x_TD.shape[-1]))
