"""The one capacity formula of every routed layer with static slots (docs/methods.md, capacity).

Top-k MoE with capacity execution, expert-choice MoE, SMHA heads and UoME experts all give each
expert C = ceil(factor · n · k / E) slots out of a group of n tokens in which every token makes k
choices among E experts, clamped to [1, n]: an expert never holds more slots than the group has
tokens, and it always has one. The 1e-9 keeps a product that is an integer in exact arithmetic
(1.1 · 10 · 2 / 2) from rounding up by float error.
"""

import math


def capacity(tokens: int, per_token: int, num_experts: int, factor: float) -> int:
  """Slots per expert for a group of `tokens` tokens that each choose `per_token` of
  `num_experts` experts: ceil(factor * tokens * per_token / num_experts), between 1 and tokens."""
  if factor <= 0:
    raise ValueError(f'capacity factor={factor}: expected > 0')
  slots = math.ceil(factor * tokens * per_token / num_experts - 1e-9)
  return max(1, min(tokens, slots))


def is_full(per_token: int, num_experts: int, factor: float) -> bool:
  """True when every choice gets a slot whatever the routing (factor · k >= E): nothing is dropped
  and no token competes with another, so the layer stays causal."""
  return factor * per_token >= num_experts - 1e-9
