"""Warm starts: a new run that begins from another run's weights (`train.init_from=DIR[@STEP]`).

The optimizer starts fresh at step 0 and the data order is this run's own; only the model comes
from the source checkpoint, in one of three ways (`train.init_from_mode`):
- `copy`: the source model's whole state (parameters and routing state: k-means means, loss-free
  biases, trigger state), for continued pretraining of the same architecture;
- `upcycle`: sparse upcycling of a dense run into a top-k MoE run (Komatsuzaki et al. 2023): every
  expert of an MoE layer is a copy of the dense layer's MLP and the router keeps this run's own
  initialisation; everything else is copied. With renormalised top-k weights (`moe.renormalize`,
  summing to 1 over identical experts) the upcycled model computes exactly the dense model,
  whatever the router;
- `uoe`: the exact dense -> Union of Experts conversion (`model.uoe_convert`).
Every parameter's shape is checked against what this run's config builds; all misfits are named
in one line, before anything is written.
"""

import jax
import numpy as np
from flax import nnx

from configs import schema
from data import storage
from model import plan, uoe_convert
from model.config import ConfigError
from train.checkpoint import Checkpointer
from train.restore import checkpoint_step, read_run_config, restore_model
from train.step import build_model

MODES = ('copy', 'upcycle', 'uoe')


def parse(init_from: str) -> tuple[str, int | None]:
  """'DIR' or 'DIR@STEP' -> (DIR, STEP or None for the newest)."""
  path, at, step = init_from.rpartition('@') if '@' in init_from else (init_from, '', '')
  if at and not step.isdigit():
    raise ConfigError(f'train.init_from={init_from!r}: expected DIR or DIR@STEP (STEP an integer)')
  return path, int(step) if at else None


def _regrouped(source: dict, source_cfg, cfg) -> dict:
  """The source state with its layers grouped into the stages of ModelConfig `cfg`."""
  layers = plan.layer_states(source, source_cfg)
  return {**source, 'stages': plan.stage_states(layers, cfg)}


def _upcycle(source: dict, source_cfg, cfg: schema.Config, target: dict) -> dict:
  """The dense state with every MoE layer's experts copies of its MLP (router: `target`'s)."""
  m = cfg.model.moe
  if m.hidden(cfg.model.mlp_dim) != source_cfg.mlp_dim:
    raise ConfigError(
      f'train.init_from_mode=upcycle: an expert has moe.expert_dim={m.hidden(cfg.model.mlp_dim)} '
      f'hidden units but the dense MLP has {source_cfg.mlp_dim}; set moe.expert_dim to it'
    )
  if m.shared_experts:
    raise ConfigError('train.init_from_mode=upcycle: moe.shared_experts must be 0')
  layers = []
  new_layers = plan.layer_states(target, cfg.model)
  for layer, spec, new in zip(
    plan.layer_states(source, source_cfg), cfg.model.layer_specs(), new_layers
  ):
    layer = dict(layer)
    if spec.feed_forward == 'moe':
      mlp = layer['mlp']
      copies = lambda w: np.broadcast_to(w, (m.num_experts, *w.shape)).copy()
      layer['mlp'] = {
        **new['mlp'],  # router and routing state as this run initialises them
        'w_gate': copies(mlp['w_gate']),
        'w_up': copies(mlp['w_up']),
        'w_down': copies(mlp['w_down']),
      }
    layers.append(layer)
  return {**source, 'stages': plan.stage_states(layers, cfg.model)}


def _misfits(new: dict, abstract: dict, prefix: str = '') -> list[str]:
  """'path: source (shape) vs this run (shape)' for every leaf that is missing or differs."""
  out = []
  for key in sorted(set(new) | set(abstract), key=str):
    path = f'{prefix}{key}'
    if key not in new or key not in abstract:
      out.append(f'{path}: {"missing in the source" if key not in new else "not in this model"}')
    elif isinstance(abstract[key], dict):
      out += _misfits(new[key], abstract[key], path + '/')
    elif tuple(np.shape(new[key])) != tuple(abstract[key].shape):
      out.append(f'{path}: source {tuple(np.shape(new[key]))} vs this run {abstract[key].shape}')
  return out


def load(cfg: schema.Config) -> dict:
  """The model state (pure dict of numpy arrays) this run starts from; checked, nothing written."""
  t = cfg.train
  path, step = parse(t.init_from)
  step = checkpoint_step(Checkpointer(path, read_run_config(path).checkpoint, read_only=True), step)
  abstract = nnx.to_pure_dict(nnx.state(nnx.eval_shape(lambda: build_model(cfg))))
  restored = restore_model(path, step)
  source = jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(restored.model)))
  source_model = restored.cfg.model
  if source_model.num_layers != cfg.model.num_layers:
    raise ConfigError(
      f'train.init_from={path}: {source_model.num_layers} layers, this run '
      f'model.num_layers={cfg.model.num_layers}'
    )
  if t.init_from_mode == 'copy':
    new = _regrouped(source, source_model, cfg.model)
  elif t.init_from_mode == 'uoe':
    dense = uoe_convert.dense_config(cfg.model)
    new = uoe_convert.convert_dense_state(_regrouped(source, source_model, dense), cfg.model)
  else:
    target = jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(build_model(cfg))))
    new = _upcycle(source, source_model, cfg, target)
  misfits = _misfits(new, abstract)
  if misfits:
    raise ConfigError(
      f'train.init_from={storage.resolve(path)}@{step} ({t.init_from_mode}) does not fit this '
      f'model in {len(misfits)} arrays: ' + '; '.join(misfits)
    )
  return jax.tree.map(lambda a, s: np.asarray(a, dtype=s.dtype), new, abstract)


def place(state: dict, model_state: dict) -> dict:
  """`state` (fresh, sharded) with its model replaced by `model_state`, on the same shardings
  (each process builds its own shards from the full host copy)."""
  old = nnx.to_pure_dict(state['model'])
  new = jax.tree.map(
    lambda o, v: jax.make_array_from_callback(o.shape, o.sharding, lambda idx: v[idx]),
    old,
    model_state,
  )
  nnx.replace_by_pure_dict(state['model'], new)
  return state
