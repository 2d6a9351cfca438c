"""MoE routers: token-choice top-k (softmax or sigmoid scores, loss-free bias) and expert choice.

Everything here is pure and computed in f32 (ST-MoE: routers are unstable in low precision).
`route(...)` returns a `RouterOutput`; the MoE module weighs its losses and logs its statistics.
Balancing rules (METHODS.md §5): Switch loss `E * sum_i f_i P_i` with f the top-k one-hot mean
(HF/OLMoE), router z-loss `mean(logsumexp(z)^2)`, loss-free bias `b += u * sign(mean(c) - c)`.
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp

SCORES = ('softmax', 'sigmoid')


class RouterOutput(NamedTuple):
  """What a router tells the experts and the logs.

  Token choice: weights/indices are [T, K] (expert ids per token). Expert choice: [E, C] (token
  ids per expert). `load_E` counts assignments per expert (f32); `dropped_fraction` is the share of
  tokens that no expert processes (expert choice) and is filled in by capacity execution otherwise.
  """
  weights: jax.Array
  indices: jax.Array
  load_E: jax.Array
  balance_loss: jax.Array
  z_loss: jax.Array
  entropy: jax.Array
  dropped_fraction: jax.Array


def scores(logits_TE: jax.Array, score: str) -> jax.Array:
  logits_TE = logits_TE.astype(jnp.float32)
  if score == 'softmax':
    return jax.nn.softmax(logits_TE, axis=-1)
  if score == 'sigmoid':
    return jax.nn.sigmoid(logits_TE)
  raise ValueError(f'score={score!r}: expected one of {SCORES}')


def topk_route(logits_TE: jax.Array, k: int, *, score: str = 'softmax',
               bias_E: jax.Array | None = None, renormalize: bool = True
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


def z_loss(logits_TE: jax.Array) -> jax.Array:
  """ST-MoE router z-loss: mean over tokens of logsumexp(logits)^2."""
  return jnp.mean(jnp.square(jax.nn.logsumexp(logits_TE.astype(jnp.float32), axis=-1)))


def balance_loss(probs_TE: jax.Array, experts_TK: jax.Array) -> jax.Array:
  """Switch loss E * sum_i f_i P_i; f_i is the share of assignments to i (not differentiable)."""
  e = probs_TE.shape[-1]
  f_E = jax.nn.one_hot(experts_TK, e, dtype=jnp.float32).sum((0, 1)) / experts_TK.size
  return e * jnp.sum(jax.lax.stop_gradient(f_E) * probs_TE.mean(0))


def entropy(probs_TE: jax.Array) -> jax.Array:
  """Mean per-token entropy (nats) of the routing distribution."""
  return -jnp.mean(jnp.sum(probs_TE * jnp.log(jnp.maximum(probs_TE, 1e-20)), axis=-1))


def _distribution(s_TE: jax.Array, score: str) -> jax.Array:
  """Scores as a distribution over experts (sigmoid scores are normalised per token)."""
  return s_TE if score == 'softmax' else s_TE / jnp.maximum(s_TE.sum(-1, keepdims=True), 1e-9)


def route_topk(logits_TE: jax.Array, k: int, *, score: str = 'softmax',
               bias_E: jax.Array | None = None, renormalize: bool = True) -> RouterOutput:
  """Token-choice routing with its losses and statistics."""
  logits_TE = logits_TE.astype(jnp.float32)
  weights_TK, experts_TK = topk_route(logits_TE, k, score=score, bias_E=bias_E,
                                      renormalize=renormalize)
  probs_TE = _distribution(scores(logits_TE, score), score)
  e = logits_TE.shape[-1]
  load_E = jax.nn.one_hot(experts_TK, e, dtype=jnp.float32).sum((0, 1))
  return RouterOutput(weights_TK, experts_TK, load_E, balance_loss(probs_TE, experts_TK),
                      z_loss(logits_TE), entropy(probs_TE), jnp.zeros((), jnp.float32))


def expert_choice_capacity(tokens: int, num_experts: int, capacity_factor: float) -> int:
  """Tokens each expert takes from a group: ceil(n * c / E), at most n."""
  return max(1, min(tokens, -(-int(tokens * capacity_factor) // num_experts)))


def route_expert_choice(logits_TE: jax.Array, capacity: int) -> RouterOutput:
  """Expert choice (Zhou et al. 2022): each expert takes its top-`capacity` tokens of the group.

  The selection compares tokens across the whole group, so in a causal LM it sees future tokens
  of the group (a train/inference mismatch; see docs/moe.md). Weights and indices are [E, C].
  """
  logits_TE = logits_TE.astype(jnp.float32)
  probs_TE = jax.nn.softmax(logits_TE, axis=-1)
  weights_EC, tokens_EC = jax.lax.top_k(probs_TE.T, capacity)
  t, e = probs_TE.shape
  picked_T = jnp.zeros((t,), jnp.float32).at[tokens_EC.reshape(-1)].add(1.0)
  load_E = jnp.full((e,), float(capacity), jnp.float32)
  return RouterOutput(weights_EC, tokens_EC.astype(jnp.int32), load_E,
                      jnp.zeros((), jnp.float32), z_loss(logits_TE), entropy(probs_TE),
                      jnp.mean((picked_T == 0).astype(jnp.float32)))


def update_bias(bias_E: jax.Array, load_E: jax.Array, rate: float) -> jax.Array:
  """Loss-free balancing: raise the bias of under-loaded experts, lower it for over-loaded ones."""
  return bias_E + rate * jnp.sign(jnp.mean(load_E) - load_E)
