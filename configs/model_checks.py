"""The checks of a whole experiment config that concern its model: routing-attention clusters and
UoE capacities against the sequence length, and the layer plan (`model.plan`: known kinds, a
routed layer for the entropy trigger, packing refused for a model whose layers read the future).
Called by `configs.schema.validate`; each failure is one ConfigError naming the field."""

from model.config import ConfigError


def check(cfg) -> None:
  """Raises ConfigError for the first model check that `cfg` (a `schema.Config`) fails."""
  _routing(cfg)
  _uoe(cfg)
  _plan(cfg)
  from model import gmm  # pylint: disable=g-import-not-at-top  (the grouped-matmul kernel runs here)

  gmm.check_config(cfg.model)


def _plan(cfg) -> None:
  """The layer plan (`model.plan`): every kind and router known, a routed layer for the entropy
  trigger. Packed documents must never influence each other: a layer that selects over the whole
  row cannot guarantee it, so such a model refuses data.packing=True."""
  from model import plan  # pylint: disable=g-import-not-at-top  (model code is heavy)

  reasons = plan.build(cfg.model, cfg.train.seq_len).reasons
  if cfg.data.packing and reasons:
    raise ConfigError(
      f'data.packing=True is refused: {reasons[0]}; packed documents would '
      'influence each other (use data.packing=False)'
    )


def _routing(cfg) -> None:
  a, seq_len = cfg.attention, cfg.train.seq_len
  if a.kind != 'routing':
    return
  if a.window > seq_len:
    raise ConfigError(f'attention.window={a.window} exceeds train.seq_len={seq_len}')
  if a.num_clusters == 0:
    raise ConfigError(
      f'attention.window={a.window} must divide train.seq_len={seq_len} to derive '
      'attention.num_clusters (or set attention.num_clusters)'
    )
  if a.num_clusters > seq_len:
    raise ConfigError(
      f'attention.num_clusters={a.num_clusters}: more clusters than the '
      f'train.seq_len={seq_len} tokens of a sequence'
    )


def _uoe(cfg) -> None:
  """Static capacities must fit in a sequence: a head or expert cannot take more than L tokens."""
  u, h = cfg.model.uoe, cfg.model.num_heads
  k = u.resolved_heads_per_token(h)
  if u.attention == 'smha' and u.head_capacity * k > h + 1e-9:
    raise ConfigError(
      f'uoe.head_capacity={u.head_capacity}: head_capacity * heads_per_token = '
      f'{u.head_capacity * k:g} exceeds model.num_heads={h} (a head cannot take more than '
      'the whole sequence)'
    )
  e, k = u.num_experts, u.experts_per_token
  if (
    u.feed_forward == 'uome' and u.paradigm == 'data_selection' and u.expert_capacity * k > e + 1e-9
  ):
    raise ConfigError(
      f'uoe.expert_capacity={u.expert_capacity}: expert_capacity * experts_per_token = '
      f'{u.expert_capacity * k:g} exceeds uoe.num_experts={e} (an expert cannot take more '
      'than the whole sequence)'
    )
