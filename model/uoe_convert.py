"""Dense <-> Union of Experts conversion of a model's weights (docs/uoe.md, the exact decomposition).

SMHA keeps the dense attention's projections (heads are already the expert axis) and adds a gate;
UoME splits the MLP into E column/row blocks (`uoe.mlp_to_experts`) and adds a gate. At full
capacity with uniform gates the converted model equals the dense one exactly.
"""

import dataclasses

import jax

from model import plan
from model.uoe import experts_to_mlp, mlp_to_experts


def dense_config(cfg):
  """`cfg` (a ModelConfig) without UoE layers: the dense model a UoE model converts from and to."""
  uoe = dataclasses.replace(cfg.uoe, attention='dense', feed_forward='mlp')
  return dataclasses.replace(cfg, uoe=uoe)


def convert_dense_state(
  state: dict, cfg, key: jax.Array | None = None, gate_std: float = 0.0
) -> dict:
  """A dense model's `nnx.to_pure_dict` state -> the state of the UoE model of ModelConfig `cfg`.

  Attention weights keep their layout (heads are already the expert axis); MLPs are split by
  `mlp_to_experts`. The gates, absent from a dense model, are zero by default: a uniform gate, so
  with every expert at full capacity and `gate_outputs=True` (weight E·1/E = 1) the UoE model
  equals the dense one exactly (ties in the top-k then go to the lowest expert index). With
  `gate_std` > 0 they are drawn from N(0, gate_std²) with `key` instead (no longer exact).
  """
  key = jax.random.key(0) if key is None else key
  u = cfg.uoe
  layers = plan.layer_states(state, dense_config(cfg))
  out = []
  for i, (layer, spec) in enumerate(zip(layers, cfg.layer_specs())):
    layer = dict(layer)
    k_attn, k_mlp = jax.random.split(jax.random.fold_in(key, i))
    draw = lambda k, e: (gate_std * jax.random.normal(k, (cfg.d_model, e))).astype(cfg.param_dtype)
    if spec.attention == 'smha':
      layer['attn'] = {**layer['attn'], 'router': draw(k_attn, cfg.num_heads)}
    if spec.feed_forward == 'uome':
      mlp = layer['mlp']
      w_gate, w_up, w_down = mlp_to_experts(
        mlp['w_gate'], mlp['w_up'], mlp['w_down'], u.num_experts
      )
      layer['mlp'] = {
        'router': draw(k_mlp, u.num_experts),
        'w_gate': w_gate,
        'w_up': w_up,
        'w_down': w_down,
      }
    out.append(layer)
  return {**state, 'stages': plan.stage_states(out, cfg)}


def convert_uoe_state(state: dict, cfg) -> dict:
  """The inverse of `convert_dense_state`: a UoE model's pure-dict state -> the dense model's."""
  out = []
  for layer, spec in zip(plan.layer_states(state, cfg), cfg.layer_specs()):
    layer = dict(layer)
    if spec.attention == 'smha':
      layer['attn'] = {k: v for k, v in layer['attn'].items() if k != 'router'}
    if spec.feed_forward == 'uome':
      mlp = layer['mlp']
      w_gate, w_up, w_down = experts_to_mlp(mlp['w_gate'], mlp['w_up'], mlp['w_down'])
      layer['mlp'] = {'w_gate': w_gate, 'w_up': w_up, 'w_down': w_down}
    out.append(layer)
  return {**state, 'stages': plan.stage_states(out, dense_config(cfg))}
