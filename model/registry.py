"""Every layer kind and router by name: the one table that model construction, the layer plan
(`model.plan`) and config errors read. A new kind is added here and nowhere else.

A layer kind is an nnx.Module class called as the protocol of `model.block` says, which also
declares, as static or class methods and attributes, what it is without being built:
`reads_future(cfg)` (why its output at t can depend on tokens after t, or None),
`num_params(cfg)` (its learned parameters), `active_params(cfg, seq_len)` (matmul weights per
token), `describe(cfg)` (one line), `METRICS` (the prefix of the per-layer metrics it reports, or
None) and `GATED` (whether it has a learned router the entropy trigger monitors); attention kinds
also `score_flops(cfg, seq_len)` (training FLOPs per token of scores and weighted sum).
"""

from model import router
from model.attention import Attention
from model.config import ConfigError
from model.layers import MLP
from model.local_layer import LocalAttention
from model.moe_layer import MoE
from model.routing_layer import RoutingAttention
from model.uoe_layer import SelectiveAttention, UnionMLP

ATTENTION = {
  'dense': Attention,  # full causal attention (GQA, RoPE)
  'local': LocalAttention,  # blocked causal sliding window, every head
  'routing': RoutingAttention,  # Routing Transformer: k-means routing heads + local heads
  'smha': SelectiveAttention,  # Union of Experts: selective multi-head attention
}
FEED_FORWARD = {
  'mlp': MLP,  # dense SwiGLU
  'moe': MoE,  # mixture of SwiGLU experts (router, execution and losses from the moe group)
  'uome': UnionMLP,  # Union of Experts: the dense MLP as gated column/row blocks
}
ROUTERS = {  # moe.router: who chooses
  'topk': router.route_topk,  # each token picks its top-k experts
  'expert_choice': router.route_expert_choice,  # each expert picks its top-C tokens of a sequence
}
_TABLES = {
  'attention kind': ATTENTION,
  'feed-forward kind': FEED_FORWARD,
  'router': ROUTERS,
}


def lookup(table: str, name: str, field: str):
  """`name` in the table `table` ('attention kind', 'feed-forward kind' or 'router'); an unknown
  name is a one-line ConfigError naming `field` and the known names."""
  entries = _TABLES[table]
  if name not in entries:
    raise ConfigError(f'{field}={name!r}: unknown {table}; known: {", ".join(entries)}')
  return entries[name]
