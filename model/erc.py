"""Expert-router coupling (ERC) loss, Lv et al. 2026 (arXiv 2512.23447), docs/moe.md "ERC loss".

Pure functions, computed in f32. The router rows R_i are the columns of `router_DE`; the experts'
gate projections are `w_gate_EDF` (W_g^j = w_gate_EDF[j]). Cost n²·D·F, independent of tokens.
"""

import jax
import jax.numpy as jnp

PRECISION = jax.lax.Precision.HIGHEST  # f32 matmuls even where the backend would use TF32


def _rows(router_DE: jax.Array) -> jax.Array:
  """Router rows R [E, D] in f32."""
  return router_DE.astype(jnp.float32).T


def epsilon(router_DE: jax.Array) -> jax.Array:
  """Eq. 4 noise bound per row: eps_i = min_{j!=i} ||R_i - R_j|| / (2 ||R_i||), stop-gradient."""
  r_ED = jax.lax.stop_gradient(_rows(router_DE))
  sq_E = jnp.sum(r_ED * r_ED, axis=-1)
  gram_EE = jnp.matmul(r_ED, r_ED.T, precision=PRECISION)
  dist_EE = jnp.sqrt(jnp.maximum(sq_E[:, None] + sq_E[None, :] - 2.0 * gram_EE, 0.0))
  dist_EE = jnp.where(jnp.eye(r_ED.shape[0], dtype=bool), jnp.inf, dist_EE)
  return dist_EE.min(axis=1) / (2.0 * jnp.maximum(jnp.sqrt(sq_E), 1e-30))


def mean_epsilon(router_DE: jax.Array) -> jax.Array:
  """mean_i eps_i, the specialisation signal logged per layer (Fig. 5a)."""
  return jnp.mean(epsilon(router_DE))


def erc_noise(rng: jax.Array, router_DE: jax.Array) -> jax.Array:
  """delta_ED: delta_i ~ U(1 - eps_i, 1 + eps_i) per element of row i (Eq. 4), f32, no gradient."""
  eps_E1 = epsilon(router_DE)[:, None]
  d, e = router_DE.shape
  return jax.random.uniform(rng, (e, d), jnp.float32, 1.0 - eps_E1, 1.0 + eps_E1)


def _norm(x: jax.Array, axis: int) -> jax.Array:
  """L2 norm whose gradient at 0 is 0 rather than NaN."""
  sq = jnp.sum(x * x, axis=axis)
  pos = sq > 0
  return jnp.where(pos, jnp.sqrt(jnp.where(pos, sq, 1.0)), 0.0)


def activations(
  router_DE: jax.Array,
  w_gate_EDF: jax.Array,
  *,
  delta_ED: jax.Array | None = None,
  grad_to_router: bool = False,
) -> jax.Array:
  """M[i, j] = ||R~_i W_g^j||_2 [E, E] with R~ = delta ⊙ R.

  R~ is stop-gradient unless `grad_to_router`, which keeps the gradient through R (not delta).
  """
  r_ED = _rows(router_DE)
  if delta_ED is not None:
    r_ED = jax.lax.stop_gradient(delta_ED).astype(jnp.float32) * r_ED
  if not grad_to_router:
    r_ED = jax.lax.stop_gradient(r_ED)
  h_EEF = jnp.einsum('id,jdf->ijf', r_ED, w_gate_EDF.astype(jnp.float32), precision=PRECISION)
  return _norm(h_EEF, axis=-1)


def erc_loss(
  router_DE: jax.Array,
  w_gate_EDF: jax.Array,
  *,
  alpha: float = 1.0,
  delta_ED: jax.Array | None = None,
  grad_to_router: bool = False,
) -> jax.Array:
  """Eq. 3: 1/n² Σ_i Σ_{j≠i} [relu(M[i,j] − α M[i,i]) + relu(M[j,i] − α M[i,i])], f32 scalar."""
  m_EE = activations(router_DE, w_gate_EDF, delta_ED=delta_ED, grad_to_router=grad_to_router)
  diag_E = jnp.diag(m_EE)
  row_EE = jax.nn.relu(m_EE - alpha * diag_E[:, None])  # expert specialisation
  col_EE = jax.nn.relu(m_EE - alpha * diag_E[None, :])  # router precision
  off_EE = 1.0 - jnp.eye(m_EE.shape[0], dtype=jnp.float32)
  return jnp.mean((row_EE + col_EE) * off_EE)


def coupling_level(router_DE: jax.Array, w_gate_EDF: jax.Array) -> jax.Array:
  """alpha* = max_{i≠j} max(M[i,j], M[j,i]) / M[i,i] without noise: the smallest alpha at which
  every Eq. 3 constraint holds (0 loss). Stop-gradient; a vanilla MoE reaches about 5 (App. A.1)."""
  m_EE = jax.lax.stop_gradient(activations(router_DE, w_gate_EDF))
  diag_E = jnp.maximum(jnp.diag(m_EE), 1e-30)
  ratio_EE = jnp.maximum(m_EE / diag_E[:, None], m_EE / diag_E[None, :])
  ratio_EE = jnp.where(jnp.eye(m_EE.shape[0], dtype=bool), -jnp.inf, ratio_EE)
  return jnp.max(ratio_EE)
