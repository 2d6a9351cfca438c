"""Named presets mapping logical axis names to mesh axes.

Parameters use `embed, heads, kv_heads, kv, mlp, vocab, expert, layers, norm`; activations use
`batch, length` and `act_*` names so that a parameter dimension (sharded for FSDP) and the same
dimension of an activation (kept whole) can map differently. Model code names only logical axes.
"""

MESH_AXES = ('data', 'fsdp', 'tensor', 'expert')

# Axes over which the batch is split: everything but tensor parallelism.
_BATCH = ('data', 'fsdp', 'expert')

_DP = {
  'batch': _BATCH,
}

_FSDP = {
  **_DP,
  'embed': 'fsdp',
}

_FSDP_TP = {
  **_FSDP,
  'heads': 'tensor',
  'kv_heads': 'tensor',
  'mlp': 'tensor',
  'vocab': 'tensor',
  'act_heads': 'tensor',
  'act_kv_heads': 'tensor',
  'act_mlp': 'tensor',
  'act_vocab': 'tensor',
}

_FSDP_EP = {
  **_FSDP,
  'expert': 'expert',
  'act_expert': 'expert',
}

PRESETS = {
  'dp': _DP,
  'fsdp': _FSDP,
  'fsdp_tp': _FSDP_TP,
  'fsdp_ep': _FSDP_EP,
}


def rules(name: str) -> dict:
  """The logical->mesh mapping of a preset; unknown logical names stay replicated."""
  if name not in PRESETS:
    raise ValueError(f'mesh.rules={name!r} is not a preset; expected one of {sorted(PRESETS)}')
  return dict(PRESETS[name])
