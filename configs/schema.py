"""ConfigDict -> frozen dataclasses, validated once at the boundary.

`load(config_dict, num_devices)` is the only place a ConfigDict is read. Every error is a
`ConfigError` whose one-line message names the field and what was expected.
"""

import dataclasses
import math
import typing
from typing import Any

import ml_collections

from configs import model_checks, sharding
from model.config import (
  AttentionConfig,
  ConfigError,
  EntropyConfig,
  ModelConfig,
  MoEConfig,
  UoEConfig,
  check_finite,
)

# Groups of the config file that live inside ModelConfig (a field of that name whose type is the
# group's dataclass): a new mechanism adds its dataclass to ModelConfig and is picked up here.
MODEL_GROUPS = tuple(
  f.name for f in dataclasses.fields(ModelConfig) if dataclasses.is_dataclass(f.type)
)

DECAYS = ('cosine', 'linear', 'constant')
TOKENIZERS = ('byte', 'sentencepiece:PATH', 'hf:PATH')
VERIFY_MODES = ('auto', 'full', 'sizes', 'off')


@dataclasses.dataclass(frozen=True)
class DataConfig:
  path: str = ''
  tokenizer: str = 'byte'
  heldout_fraction: float = 0.02
  cache_dir: str = ''
  seed: int = 0
  worker_count: int = 0
  prefetch: int = 2
  read_threads: int = 0
  packing: bool = False
  verify: str = 'auto'


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
  learning_rate: float = 3e-4
  warmup_steps: int = 200
  decay: str = 'cosine'
  min_lr_ratio: float = 0.1
  b1: float = 0.9
  b2: float = 0.95
  eps: float = 1e-8
  weight_decay: float = 0.1
  grad_clip: float = 1.0


INIT_FROM_MODES = ('copy', 'upcycle', 'uoe')  # train.init_from_mode: train/warm_start.py


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  steps: int = 10000
  batch_size: int = 64
  seq_len: int = 1024
  grad_accum: int = 1
  seed: int = 0
  log_every: int = 10
  peak_tflops: float = 989.0
  stop_after: int = 0
  on_nonfinite: str = 'stop'
  nonfinite_patience: int = 10
  check_memory: bool = True
  init_from: str = ''
  init_from_mode: str = 'copy'


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
  every_steps: int = 1000
  max_to_keep: int = 3
  async_save: bool = True


@dataclasses.dataclass(frozen=True)
class MeshConfig:
  shape: tuple[int, ...] = (1, -1, 1, 1)
  rules: str = 'fsdp'
  dcn_shape: tuple[int, ...] = ()

  def resolved_shape(self, num_devices: int) -> tuple[int, ...]:
    """The shape with its -1 filled in; assumes `validate` passed."""
    known = math.prod(s for s in self.shape if s != -1)
    return tuple(num_devices // known if s == -1 else s for s in self.shape)

  def axis_size(self, axis: str, num_devices: int) -> int:
    return self.resolved_shape(num_devices)[sharding.MESH_AXES.index(axis)]


@dataclasses.dataclass(frozen=True)
class EvalConfig:
  batch_size: int = 16
  max_batches: int = 50
  every_steps: int = 0
  positions_per_window: int = 4


@dataclasses.dataclass(frozen=True)
class Config:
  model: ModelConfig
  data: DataConfig
  optimizer: OptimizerConfig
  train: TrainConfig
  checkpoint: CheckpointConfig
  mesh: MeshConfig
  eval: EvalConfig

  @property
  def attention(self) -> AttentionConfig:
    return self.model.attention

  @property
  def moe(self) -> MoEConfig:
    return self.model.moe

  @property
  def entropy(self) -> EntropyConfig:
    return self.model.entropy

  @property
  def uoe(self) -> UoEConfig:
    return self.model.uoe

  def to_dict(self) -> dict:
    """The nested plain dict written to `config.json` (groups as in the config file)."""
    out = dataclasses.asdict(self)
    for group in MODEL_GROUPS:
      out[group] = out['model'].pop(group)
    return out


_GROUPS = {
  'model': ModelConfig,
  'data': DataConfig,
  'optimizer': OptimizerConfig,
  'train': TrainConfig,
  'checkpoint': CheckpointConfig,
  'mesh': MeshConfig,
  'eval': EvalConfig,
  **{f.name: f.type for f in dataclasses.fields(ModelConfig) if f.name in MODEL_GROUPS},
}


def _coerce(path: str, value: Any, kind: Any) -> Any:
  """Checks one value against its dataclass field type, allowing int where float is expected."""
  origin = typing.get_origin(kind)
  if origin in (tuple,):
    if not isinstance(value, (tuple, list)) or not all(
      isinstance(v, int) and not isinstance(v, bool) for v in value
    ):
      raise ConfigError(f'{path}={value!r}: expected a tuple of integers')
    return tuple(value)
  if kind is float and isinstance(value, int) and not isinstance(value, bool):
    return float(value)
  if kind is int and isinstance(value, bool) or not isinstance(value, kind):
    raise ConfigError(f'{path}={value!r}: expected {kind.__name__}, got {type(value).__name__}')
  return value


def _group(name: str, values: dict, **nested) -> Any:
  cls = _GROUPS[name]
  hints = typing.get_type_hints(cls)
  fields = {f.name for f in dataclasses.fields(cls)} - set(nested)
  unknown = sorted(set(values) - fields)
  if unknown:
    raise ConfigError(f'{name}.{unknown[0]}: unknown field; expected one of {sorted(fields)}')
  kwargs = {k: _coerce(f'{name}.{k}', v, hints[k]) for k, v in values.items()}
  return cls(**kwargs, **nested)


def from_dict(tree: dict) -> Config:
  """Builds the dataclasses from a nested dict (a ConfigDict's `to_dict()` or `config.json`)."""
  unknown = sorted(set(tree) - set(_GROUPS))
  if unknown:
    raise ConfigError(f'{unknown[0]}: unknown config group; expected one of {sorted(_GROUPS)}')
  get = lambda name: dict(tree.get(name) or {})
  groups = {g: get(g) for g in MODEL_GROUPS}
  if 'dropless_impl' in groups['moe']:  # config.json before moe.gmm_impl ('blocked' is 'scan')
    old = groups['moe'].pop('dropless_impl')
    groups['moe'].setdefault('gmm_impl', 'scan' if old == 'blocked' else old)
  model = _group('model', get('model'), **{g: _group(g, v) for g, v in groups.items()})
  cfg = Config(
    model=model,
    **{g: _group(g, get(g)) for g in ('data', 'optimizer', 'train', 'checkpoint', 'mesh', 'eval')},
  )
  return _derive_clusters(cfg)


def _derive_clusters(cfg: Config) -> Config:
  """attention.num_clusters = 0 means train.seq_len // attention.window (when it divides)."""
  a, seq_len = cfg.attention, cfg.train.seq_len
  if a.kind != 'routing' or a.num_clusters or a.window < 1 or seq_len % a.window:
    return cfg
  attention = dataclasses.replace(a, num_clusters=seq_len // a.window)
  return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, attention=attention))


def load(config: ml_collections.ConfigDict | dict, num_devices: int) -> Config:
  """Converts and validates a whole experiment config for a run on `num_devices` devices."""
  tree = config.to_dict() if isinstance(config, ml_collections.ConfigDict) else config
  cfg = from_dict(tree)
  validate(cfg, num_devices)
  return cfg


def _positive(path: str, value: float) -> None:
  if value <= 0:
    raise ConfigError(f'{path}={value}: expected a positive value')


def validate(cfg: Config, num_devices: int) -> None:
  """Cross-field checks; raises ConfigError naming the first offending field."""
  for group in ('data', 'optimizer', 'train', 'checkpoint', 'mesh', 'eval'):
    check_finite(group, getattr(cfg, group))  # nan passes every range check below
  cfg.model.validate()
  t, o, d, k, e = cfg.train, cfg.optimizer, cfg.data, cfg.checkpoint, cfg.eval
  for path, value in (
    ('train.steps', t.steps),
    ('train.batch_size', t.batch_size),
    ('train.seq_len', t.seq_len),
    ('train.grad_accum', t.grad_accum),
    ('train.log_every', t.log_every),
    ('optimizer.learning_rate', o.learning_rate),
    ('checkpoint.every_steps', k.every_steps),
    ('checkpoint.max_to_keep', k.max_to_keep),
    ('eval.batch_size', e.batch_size),
    ('optimizer.eps', o.eps),
  ):
    _positive(path, value)
  if o.decay not in DECAYS:
    raise ConfigError(f'optimizer.decay={o.decay!r}: expected one of {DECAYS}')
  if not 0 <= o.min_lr_ratio <= 1:
    raise ConfigError(f'optimizer.min_lr_ratio={o.min_lr_ratio}: expected a value in [0, 1]')
  if o.warmup_steps < 0 or o.warmup_steps >= t.steps:
    raise ConfigError(
      f'optimizer.warmup_steps={o.warmup_steps}: expected 0 <= warmup < train.steps={t.steps}'
    )
  for path, value in (
    ('optimizer.weight_decay', o.weight_decay),
    ('optimizer.grad_clip', o.grad_clip),
    ('train.seed', t.seed),
    ('data.seed', d.seed),
  ):
    if value < 0:
      raise ConfigError(f'{path}={value}: expected a value >= 0')
  if t.on_nonfinite not in ('stop', 'skip'):
    raise ConfigError(f"train.on_nonfinite={t.on_nonfinite!r}: expected 'stop' or 'skip'")
  if t.nonfinite_patience < 1:
    raise ConfigError(f'train.nonfinite_patience={t.nonfinite_patience}: expected >= 1')
  if t.init_from_mode not in INIT_FROM_MODES:
    raise ConfigError(
      f'train.init_from_mode={t.init_from_mode!r}: expected one of {INIT_FROM_MODES}'
    )
  if not 0 <= o.b1 < 1 or not 0 <= o.b2 < 1:
    raise ConfigError(f'optimizer.b1={o.b1}, optimizer.b2={o.b2}: expected values in [0, 1)')
  if t.stop_after < 0 or e.max_batches < 0 or e.every_steps < 0 or t.peak_tflops < 0:
    raise ConfigError(
      'train.stop_after, train.peak_tflops, eval.max_batches and eval.every_steps must be >= 0'
    )
  if e.positions_per_window < 1:
    raise ConfigError(
      f'eval.positions_per_window={e.positions_per_window}: expected >= 1 (positions '
      'scored from their exact prefix per held-out window, for non-causal models)'
    )
  kind, _, tok_path = d.tokenizer.partition(':')
  if d.tokenizer != 'byte' and not (kind in ('sentencepiece', 'hf') and tok_path):
    raise ConfigError(f'data.tokenizer={d.tokenizer!r}: expected one of {TOKENIZERS}')
  if not 0 < d.heldout_fraction < 1:
    raise ConfigError(f'data.heldout_fraction={d.heldout_fraction}: expected a value in (0, 1)')
  if d.worker_count < 0 or d.prefetch < 1:
    raise ConfigError('data.worker_count must be >= 0 and data.prefetch >= 1')
  if d.read_threads < 0:
    raise ConfigError(f'data.read_threads={d.read_threads}: expected a value >= 0')
  if d.verify not in VERIFY_MODES:
    raise ConfigError(f'data.verify={d.verify!r}: expected one of {VERIFY_MODES}')
  model_checks.check(cfg)
  _validate_mesh(cfg, num_devices)


def _validate_mesh(cfg: Config, num_devices: int) -> None:
  m, t = cfg.mesh, cfg.train
  if m.rules not in sharding.PRESETS:
    raise ConfigError(f'mesh.rules={m.rules!r}: expected one of {sorted(sharding.PRESETS)}')
  if len(m.shape) != len(sharding.MESH_AXES):
    raise ConfigError(
      f'mesh.shape={m.shape}: expected {len(sharding.MESH_AXES)} sizes for axes {sharding.MESH_AXES}'
    )
  if m.shape.count(-1) > 1 or any(s == 0 or s < -1 for s in m.shape):
    raise ConfigError(f'mesh.shape={m.shape}: expected positive sizes and at most one -1')
  if m.dcn_shape and (len(m.dcn_shape) != len(m.shape) or any(s < 1 for s in m.dcn_shape)):
    raise ConfigError(
      f'mesh.dcn_shape={m.dcn_shape}: expected () or {len(sharding.MESH_AXES)} '
      f'positive sizes for axes {sharding.MESH_AXES}'
    )
  known = math.prod(s for s in m.shape if s != -1)
  if known > num_devices or (-1 not in m.shape and known != num_devices) or num_devices % known:
    raise ConfigError(
      f'mesh.shape={m.shape} needs {known} devices{" (or a divisor of the count)" if -1 in m.shape else ""}; '
      f'{num_devices} are available'
    )
  size = dict(zip(sharding.MESH_AXES, m.resolved_shape(num_devices)))
  data_parallel = size['data'] * size['fsdp'] * size['expert']
  if t.batch_size % (data_parallel * t.grad_accum):
    raise ConfigError(
      f'train.batch_size={t.batch_size} must divide by the data-parallel size '
      f'{data_parallel} times train.grad_accum={t.grad_accum}'
    )
  if cfg.eval.batch_size % data_parallel:
    raise ConfigError(
      f'eval.batch_size={cfg.eval.batch_size} must divide by the data-parallel size {data_parallel}'
    )
  rules = sharding.rules(m.rules)
  model = cfg.model
  dims = {
    'embed': 'd_model',
    'mlp': 'mlp_dim',
    'heads': 'num_heads',
    'kv_heads': 'num_kv_heads',
    'vocab': 'vocab_size',
  }
  for logical, field in dims.items():
    axes = rules.get(logical)
    axes = (axes,) if isinstance(axes, str) else (axes or ())
    n = math.prod(size[a] for a in axes)
    if getattr(model, field) % n:
      raise ConfigError(
        f'model.{field}={getattr(model, field)} must divide over mesh axes {axes} '
        f'of size {n} (mesh.rules={m.rules!r}, mesh.shape={m.shape})'
      )
  moe = model.moe
  if moe.num_experts:
    for logical, field, value in (
      ('expert', 'num_experts', moe.num_experts),
      ('mlp', 'expert_dim', moe.hidden(model.mlp_dim)),
    ):
      axes = rules.get(logical)
      axes = (axes,) if isinstance(axes, str) else (axes or ())
      n = math.prod(size[a] for a in axes)
      if value % n:
        raise ConfigError(
          f'moe.{field}={value} must divide over mesh axes {axes} of size {n} '
          f'(mesh.rules={m.rules!r}, mesh.shape={m.shape})'
        )
  u = model.uoe
  if u.feed_forward == 'uome':
    for logical, field, value in (
      ('expert', 'num_experts', u.num_experts),
      ('mlp', 'mlp_dim / num_experts', model.mlp_dim // u.num_experts),
    ):
      axes = rules.get(logical)
      axes = (axes,) if isinstance(axes, str) else (axes or ())
      n = math.prod(size[a] for a in axes)
      if value % n:
        raise ConfigError(
          f'uoe.{field}={value} must divide over mesh axes {axes} of size {n} '
          f'(mesh.rules={m.rules!r}, mesh.shape={m.shape})'
        )
