"""MoE routers: token-choice top-k (softmax or sigmoid scores, loss-free bias) and expert choice.

Everything here is pure and computed in f32 (ST-MoE: routers are unstable in low precision).
`route(...)` returns a `RouterOutput`; the MoE module weighs its losses and logs its statistics.
Balancing rules (docs/moe.md): Switch loss `E * sum_i f_i P_i`, router z-loss
`mean(logsumexp(z)^2)`, loss-free bias `b += u * sign(mean(c) - c)`. Every statistic is taken over
the valid tokens only (`valid_T`, see model/validity.py): padding never moves a loss or a count.
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp

from model.validity import masked_mean

SCORES = ('softmax', 'sigmoid')
# Switch-loss normalisation of f: 'assignments' (f_i = share of all T*k assignments, sums to 1) or
# 'tokens' (f_i = share of tokens sent to i, sums to k: Hugging Face's Mixtral/OLMoE value, k times
# the other).
BALANCE_CONVENTIONS = ('assignments', 'tokens')


class RouterOutput(NamedTuple):
  """What a router tells the experts and the logs.

  Token choice: weights/indices are [T, K] (expert ids per token). Expert choice: [E, C] (token
  ids per expert) and `kept` [E, C] says which slots are used (a slot beyond the capacity of the
  valid tokens, or one holding an invalid token, has weight 0 and is not kept). `load_E` counts
  assignments per expert (f32); `dropped_fraction` is the share of tokens that no expert processes
  (expert choice) and is filled in by capacity execution otherwise.
  """

  weights: jax.Array
  indices: jax.Array
  load_E: jax.Array
  balance_loss: jax.Array
  z_loss: jax.Array
  entropy: jax.Array
  dropped_fraction: jax.Array
  kept: jax.Array | None = None


def scores(logits_TE: jax.Array, score: str) -> jax.Array:
  logits_TE = logits_TE.astype(jnp.float32)
  if score == 'softmax':
    return jax.nn.softmax(logits_TE, axis=-1)
  if score == 'sigmoid':
    return jax.nn.sigmoid(logits_TE)
  raise ValueError(f'score={score!r}: expected one of {SCORES}')


def topk_route(
  logits_TE: jax.Array,
  k: int,
  *,
  score: str = 'softmax',
  bias_E: jax.Array | None = None,
  renormalize: bool = True,
) -> tuple[jax.Array, jax.Array]:
  """Each token's top-k experts and their gate weights.

  `bias_E` (loss-free balancing) is added to the scores for the selection only; the weights are
  the raw scores of the selected experts, renormalised to sum to 1 when `renormalize`.
  """
  s_TE = scores(logits_TE, score)
  select_TE = s_TE if bias_E is None else s_TE + jax.lax.stop_gradient(bias_E).astype(jnp.float32)
  _, experts_TK = jax.lax.top_k(select_TE, k)
  weights_TK = jnp.take_along_axis(s_TE, experts_TK, axis=-1)
  if renormalize:
    weights_TK = weights_TK / jnp.maximum(weights_TK.sum(-1, keepdims=True), 1e-9)
  return weights_TK, experts_TK.astype(jnp.int32)


def z_loss(logits_TE: jax.Array, valid_T: jax.Array | None = None) -> jax.Array:
  """ST-MoE router z-loss: mean over (valid) tokens of logsumexp(logits)^2."""
  lse_T = jax.nn.logsumexp(logits_TE.astype(jnp.float32), axis=-1)
  return masked_mean(jnp.square(lse_T), valid_T)


def balance_loss(
  probs_TE: jax.Array,
  experts_TK: jax.Array,
  valid_T: jax.Array | None = None,
  convention: str = 'assignments',
) -> jax.Array:
  """Switch loss E * sum_i f_i P_i over the (valid) tokens; f is not differentiable.

  P_i is the mean router probability of expert i. f_i is, with `convention='assignments'`, the
  share of the T*k assignments that go to i (sums to 1), i.e. Hugging Face's value divided by k;
  with 'tokens', the share of tokens sent to i (sums to k), Hugging Face's Mixtral/OLMoE value.
  """
  if convention not in BALANCE_CONVENTIONS:
    raise ValueError(f'balance convention {convention!r}: expected one of {BALANCE_CONVENTIONS}')
  e, k = probs_TE.shape[-1], experts_TK.shape[-1]
  per_token_E = jax.nn.one_hot(experts_TK, e, dtype=jnp.float32).sum(1)
  f_E = masked_mean(per_token_E, valid_T) / (k if convention == 'assignments' else 1)
  return e * jnp.sum(jax.lax.stop_gradient(f_E) * masked_mean(probs_TE, valid_T))


def entropy(probs_TE: jax.Array, valid_T: jax.Array | None = None) -> jax.Array:
  """Mean per-token entropy (nats) of the routing distribution over the (valid) tokens."""
  h_T = -jnp.sum(probs_TE * jnp.log(jnp.maximum(probs_TE, 1e-20)), axis=-1)
  return masked_mean(h_T, valid_T)


def _distribution(s_TE: jax.Array, score: str) -> jax.Array:
  """Scores as a distribution over experts (sigmoid scores are normalised per token)."""
  return s_TE if score == 'softmax' else s_TE / jnp.maximum(s_TE.sum(-1, keepdims=True), 1e-9)


def route_topk(
  logits_TE: jax.Array,
  k: int,
  *,
  score: str = 'softmax',
  bias_E: jax.Array | None = None,
  renormalize: bool = True,
  valid_T: jax.Array | None = None,
  convention: str = 'assignments',
) -> RouterOutput:
  """Token-choice routing with its losses and statistics (over the valid tokens)."""
  logits_TE = logits_TE.astype(jnp.float32)
  weights_TK, experts_TK = topk_route(
    logits_TE, k, score=score, bias_E=bias_E, renormalize=renormalize
  )
  probs_TE = _distribution(scores(logits_TE, score), score)
  e = logits_TE.shape[-1]
  hot_TE = jax.nn.one_hot(experts_TK, e, dtype=jnp.float32).sum(1)
  if valid_T is not None:
    hot_TE = hot_TE * valid_T[:, None]
  return RouterOutput(
    weights_TK,
    experts_TK,
    hot_TE.sum(0),
    balance_loss(probs_TE, experts_TK, valid_T, convention),
    z_loss(logits_TE, valid_T),
    entropy(probs_TE, valid_T),
    jnp.zeros((), jnp.float32),
  )


def route_expert_choice(
  logits_TE: jax.Array,
  capacity: int,
  *,
  valid_T: jax.Array | None = None,
  used_capacity: jax.Array | None = None,
) -> RouterOutput:
  """Expert choice (Zhou et al. 2022): each expert takes its top-`capacity` tokens of the group.

  The selection compares tokens across the whole group, so in a causal LM it sees future tokens
  of the group (a train/inference mismatch; see docs/moe.md). Weights and indices are [E, C].
  Invalid tokens are never taken; with `used_capacity` (a traced count <= capacity: the slots the
  valid tokens alone would get) each expert keeps only its first `used_capacity` picks.
  """
  logits_TE = logits_TE.astype(jnp.float32)
  probs_TE = jax.nn.softmax(logits_TE, axis=-1)
  t, e = probs_TE.shape
  valid = jnp.ones((t,), bool) if valid_T is None else valid_T
  select_ET = jnp.where(valid[None, :], probs_TE.T, -1.0)  # probabilities are >= 0
  _, tokens_EC = jax.lax.top_k(select_ET, capacity)
  kept_EC = valid[tokens_EC]
  if used_capacity is not None:
    kept_EC = kept_EC & (jnp.arange(capacity)[None, :] < used_capacity)
  weights_EC = jnp.where(kept_EC, jnp.take_along_axis(probs_TE.T, tokens_EC, axis=-1), 0.0)
  picked_T = (
    jnp.zeros((t,), jnp.float32)
    .at[tokens_EC.reshape(-1)]
    .add(kept_EC.reshape(-1).astype(jnp.float32))
  )
  return RouterOutput(
    weights_EC,
    tokens_EC.astype(jnp.int32),
    kept_EC.sum(-1).astype(jnp.float32),
    jnp.zeros((), jnp.float32),
    z_loss(logits_TE, valid_T),
    entropy(probs_TE, valid_T),
    masked_mean((picked_T == 0).astype(jnp.float32), valid_T),
    kept_EC,
  )


def update_bias(bias_E: jax.Array, load_E: jax.Array, rate: float) -> jax.Array:
  """Loss-free balancing: raise the bias of under-loaded experts, lower it for over-loaded ones."""
  return bias_E + rate * jnp.sign(jnp.mean(load_E) - load_E)
