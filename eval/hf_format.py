"""Our models in Hugging Face transformers' formats, exactly or not at all (docs/hf.md).

Three families have a transformers class whose forward pass is ours to float precision:
- `llama` (`LlamaForCausalLM`): every layer dense causal attention and a SwiGLU MLP;
- `mixtral` (`MixtralForCausalLM`): every layer dense attention and a top-k MoE whose router is a
  softmax over all experts, then top-k, then renormalised (no shared experts, no loss-free bias);
- `qwen2_moe` (`Qwen2MoeForCausalLM`, no qkv bias, a zero-width shared expert): the same router
  with or without renormalisation (`norm_topk_prob`), MoE in every `moe.every`-th layer
  (`decoder_sparse_step`) and dense MLPs between. Chosen where Mixtral cannot express the model;
- `olmoe` (`OlmoeForCausalLM`): a top-k MoE in every layer under attention with q/k norms
  (`attention.qk_norm`), renormalised or not (`norm_topk_prob`).
Everything else is refused with the reason (`ExportError`), never approximated.

`family(cfg)` picks the family from the layer plan; `hf_config` / `model_config` translate the
configs; `to_hf` / `from_hf` translate the weights (a pure-dict model state <-> named numpy arrays
in transformers' layout: torch Linear weights are [out, in]). The two translations are inverses.
"""

import dataclasses

import numpy as np

from model import plan
from model.config import ModelConfig

FAMILIES = {
  'llama': 'LlamaForCausalLM',
  'mixtral': 'MixtralForCausalLM',
  'qwen2_moe': 'Qwen2MoeForCausalLM',
  'olmoe': 'OlmoeForCausalLM',
}
_SUPPORTED = (
  'dense (llama), top-k softmax MoE without shared experts or bias (mixtral when renormalised in '
  'every layer, else qwen2_moe; olmoe with attention.qk_norm)'
)


class ExportError(ValueError):
  """A model or folder with no exact equivalent on the other side; the message says why."""


def family(cfg: ModelConfig) -> str:
  """The family (a key of FAMILIES) of a model with an exact transformers equivalent; else
  ExportError naming the first obstacle."""
  layers = plan.build(cfg).layers
  for layer in layers:
    if layer.spec.attention != 'dense':
      raise ExportError(
        f'layer {layer.index} has {layer.spec.attention} attention ({layer.description}), which '
        f'no transformers model computes; exportable: {_SUPPORTED}'
      )
  kinds = {layer.spec.feed_forward for layer in layers}
  qk_norm = cfg.attention.qk_norm
  if kinds == {'mlp'} and not qk_norm:
    return 'llama'
  if qk_norm and kinds != {'moe'}:
    raise ExportError(
      'attention.qk_norm=True exports only as OLMoE, an MoE in every layer (moe.every=1); '
      f'exportable: {_SUPPORTED}'
    )
  if not kinds <= {'mlp', 'moe'}:
    raise ExportError(f'feed-forward layers {sorted(kinds)}: exportable: {_SUPPORTED}')
  m = cfg.moe
  refusals = (
    (m.router != 'topk', f'moe.router={m.router!r} (experts choose tokens)'),
    (m.score != 'softmax', f'moe.score={m.score!r}'),
    (m.shared_experts > 0, f'moe.shared_experts={m.shared_experts} (ungated)'),
    (m.bias_rate > 0, f'moe.bias_rate={m.bias_rate} (loss-free bias in the top-k choice)'),
    (any(layer.reads_future for layer in layers), 'capacity execution drops tokens'),
  )
  for refused, why in refusals:
    if refused:
      raise ExportError(f'{why} has no exact transformers equivalent; exportable: {_SUPPORTED}')
  if qk_norm:
    return 'olmoe'
  return 'mixtral' if kinds == {'moe'} and m.renormalize else 'qwen2_moe'


def hf_config(cfg: ModelConfig, fam: str, *, eos_id: int, max_positions: int) -> dict:
  """transformers' config.json for the model `cfg` of family `fam`."""
  out = {
    'architectures': [FAMILIES[fam]],
    'model_type': fam,
    'vocab_size': cfg.vocab_size,
    'hidden_size': cfg.d_model,
    'num_hidden_layers': cfg.num_layers,
    'num_attention_heads': cfg.num_heads,
    'num_key_value_heads': cfg.num_kv_heads,
    'head_dim': cfg.head_dim,
    'intermediate_size': cfg.mlp_dim,
    'hidden_act': 'silu',
    'max_position_embeddings': max_positions,
    'rms_norm_eps': cfg.norm_eps,
    'rope_theta': cfg.rope_theta,
    'rope_parameters': {'rope_type': 'default', 'rope_theta': cfg.rope_theta},
    'rope_scaling': None,
    'attention_bias': False,
    'attention_dropout': 0.0,
    'tie_word_embeddings': cfg.tie_embeddings,
    'initializer_range': cfg.init_std,
    'bos_token_id': None,
    'eos_token_id': eos_id,
    'pad_token_id': None,
    'torch_dtype': 'float32',
    'dtype': 'float32',
    'use_cache': True,
  }
  if fam == 'llama':
    out.update(mlp_bias=False, pretraining_tp=1)
  elif fam == 'olmoe':
    m = cfg.moe
    out.update(
      intermediate_size=m.hidden(cfg.mlp_dim),
      num_experts=m.num_experts,
      num_experts_per_tok=m.top_k,
      norm_topk_prob=m.renormalize,
      clip_qkv=None,
      router_aux_loss_coef=m.balance_weight,
      output_router_logits=False,
    )
  elif fam == 'qwen2_moe':
    m = cfg.moe
    out.update(
      moe_intermediate_size=m.hidden(cfg.mlp_dim),
      shared_expert_intermediate_size=0,
      num_experts=m.num_experts,
      num_experts_per_tok=m.top_k,
      norm_topk_prob=m.renormalize,
      decoder_sparse_step=m.every,
      mlp_only_layers=[],
      qkv_bias=False,
      use_sliding_window=False,
      sliding_window=None,
      max_window_layers=cfg.num_layers,
      layer_types=['full_attention'] * cfg.num_layers,
      router_aux_loss_coef=m.balance_weight,
      output_router_logits=False,
    )
  else:
    m = cfg.moe
    out.update(
      intermediate_size=m.hidden(cfg.mlp_dim),
      num_local_experts=m.num_experts,
      num_experts_per_tok=m.top_k,
      router_aux_loss_coef=m.balance_weight,
      router_jitter_noise=0.0,
      output_router_logits=False,
      sliding_window=None,
    )
  return out


# transformers options we do not implement: (key, the values we accept)
_MUST_BE = (
  ('hidden_act', ('silu',)),
  ('attention_bias', (False, None)),
  ('mlp_bias', (False, None)),
  ('sliding_window', (None,)),
  ('rope_scaling', (None,)),
  ('router_jitter_noise', (0, 0.0, None)),
  ('qkv_bias', (False, None)),
  ('use_sliding_window', (False, None)),
  ('mlp_only_layers', ([], None)),
  ('shared_expert_intermediate_size', (0, None)),  # Qwen2-MoE's sigmoid-gated shared expert
  ('clip_qkv', (None,)),  # OLMoE's clamp of q, k and v
)


def model_config(hf: dict, base: ModelConfig) -> ModelConfig:
  """Our ModelConfig for a transformers config.json (`base` gives the fields it does not set:
  dtype, remat, scan...); an architecture or option we do not implement is an ExportError."""
  model_type = hf.get('model_type')
  if model_type not in FAMILIES:
    raise ExportError(
      f'config.json model_type={model_type!r} is not supported; supported: {", ".join(FAMILIES)}'
    )
  for key, allowed in _MUST_BE:
    if key == 'sliding_window' and model_type == 'qwen2_moe':
      continue  # a window length that use_sliding_window=False leaves unused
    if hf.get(key) not in allowed:
      raise ExportError(
        f'config.json {key}={hf.get(key)!r} is not supported (expected {allowed[0]})'
      )
  rope = hf.get('rope_parameters') or {}
  if rope.get('rope_type', 'default') != 'default':
    raise ExportError(
      f'config.json rope_parameters.rope_type={rope["rope_type"]!r} is not supported'
    )
  d, h = hf['hidden_size'], hf['num_attention_heads']
  if hf.get('head_dim') not in (None, d // h):
    raise ExportError(f'config.json head_dim={hf["head_dim"]} differs from hidden_size / heads')
  fields = dict(
    vocab_size=hf['vocab_size'],
    num_layers=hf['num_hidden_layers'],
    d_model=d,
    num_heads=h,
    num_kv_heads=hf.get('num_key_value_heads') or h,
    mlp_dim=hf['intermediate_size'],
    tie_embeddings=bool(hf.get('tie_word_embeddings', False)),
    rope_theta=float(rope.get('rope_theta', hf.get('rope_theta', 10000.0))),
    norm_eps=float(hf.get('rms_norm_eps', 1e-6)),
    init_std=float(hf.get('initializer_range', base.init_std)),
  )
  moe = dataclasses.replace(base.moe, num_experts=0)
  if model_type != 'llama':  # a top-k softmax MoE: what each family calls its fields
    moe = dataclasses.replace(
      base.moe,
      num_experts=hf['num_local_experts' if model_type == 'mixtral' else 'num_experts'],
      top_k=hf['num_experts_per_tok'],
      router='topk',
      score='softmax',
      renormalize=model_type == 'mixtral' or bool(hf.get('norm_topk_prob', False)),
      every=hf.get('decoder_sparse_step', 1) if model_type == 'qwen2_moe' else 1,
      expert_dim=hf['moe_intermediate_size'] if model_type == 'qwen2_moe' else 0,
      shared_experts=0,
      execution='dropless',
      bias_rate=0.0,
      jitter=0.0,
    )
  attention = dataclasses.replace(base.attention, kind='dense', qk_norm=model_type == 'olmoe')
  uoe = dataclasses.replace(base.uoe, attention='dense', feed_forward='mlp')
  cfg = dataclasses.replace(base, **fields, moe=moe, attention=attention, uoe=uoe)
  cfg.validate()
  return cfg


def _linear(w_in_out: np.ndarray) -> np.ndarray:
  """Our [in..., out...] weight flattened to a torch Linear weight [out, in]."""
  return np.ascontiguousarray(w_in_out.T)


def _moe_names(fam: str, pre: str) -> tuple[str, str, tuple[str, str, str]]:
  """(router tensor, expert prefix, names of gate, up and down) of one MoE layer of `fam`."""
  if fam == 'mixtral':
    return (
      pre + 'block_sparse_moe.gate.weight',
      pre + 'block_sparse_moe.experts.',
      ('w1', 'w3', 'w2'),
    )
  return pre + 'mlp.gate.weight', pre + 'mlp.experts.', ('gate_proj', 'up_proj', 'down_proj')


def _zero_shared_expert(pre: str, d: int) -> dict[str, np.ndarray]:
  """Qwen2-MoE's shared expert at width 0 (its output is exactly 0) and its gate."""
  shared = pre + 'mlp.shared_expert.'
  return {
    shared + 'gate_proj.weight': np.zeros((0, d), np.float32),
    shared + 'up_proj.weight': np.zeros((0, d), np.float32),
    shared + 'down_proj.weight': np.zeros((d, 0), np.float32),
    pre + 'mlp.shared_expert_gate.weight': np.zeros((1, d), np.float32),
  }


def to_hf(state: dict, cfg: ModelConfig, fam: str) -> dict[str, np.ndarray]:
  """transformers' tensors (name -> numpy array) of a pure-dict model state of family `fam`."""
  d, h, g, k = cfg.d_model, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
  out = {'model.embed_tokens.weight': np.asarray(state['embed']['embedding'])}
  layers = plan.layer_states(state, cfg)
  for i, (layer, spec) in enumerate(zip(layers, cfg.layer_specs())):
    pre = f'model.layers.{i}.'
    attn, mlp = layer['attn'], _numpy(layer['mlp'])
    out[pre + 'input_layernorm.weight'] = np.asarray(layer['attn_norm']['scale'])
    out[pre + 'post_attention_layernorm.weight'] = np.asarray(layer['mlp_norm']['scale'])
    out[pre + 'self_attn.q_proj.weight'] = _linear(np.asarray(attn['wq']).reshape(d, h * k))
    out[pre + 'self_attn.k_proj.weight'] = _linear(np.asarray(attn['wk']).reshape(d, g * k))
    out[pre + 'self_attn.v_proj.weight'] = _linear(np.asarray(attn['wv']).reshape(d, g * k))
    out[pre + 'self_attn.o_proj.weight'] = _linear(np.asarray(attn['wo']).reshape(h * k, d))
    if cfg.attention.qk_norm:
      out[pre + 'self_attn.q_norm.weight'] = np.asarray(attn['q_norm']).reshape(h * k)
      out[pre + 'self_attn.k_norm.weight'] = np.asarray(attn['k_norm']).reshape(g * k)
    if spec.feed_forward == 'mlp':
      out[pre + 'mlp.gate_proj.weight'] = _linear(mlp['w_gate'])
      out[pre + 'mlp.up_proj.weight'] = _linear(mlp['w_up'])
      out[pre + 'mlp.down_proj.weight'] = _linear(mlp['w_down'])
      continue
    router, experts, names = _moe_names(fam, pre)
    out[router] = _linear(mlp['router'])
    for e in range(cfg.moe.num_experts):
      for ours, theirs in zip(('w_gate', 'w_up', 'w_down'), names):
        out[f'{experts}{e}.{theirs}.weight'] = _linear(mlp[ours][e])
    if fam == 'qwen2_moe':
      out.update(_zero_shared_expert(pre, d))
  out['model.norm.weight'] = np.asarray(state['final_norm']['scale'])
  if not cfg.tie_embeddings:
    out['lm_head.weight'] = _linear(np.asarray(state['head']))
  return out


def _numpy(tree: dict) -> dict:
  """A dict of arrays as numpy arrays."""
  return {key: np.asarray(value) for key, value in tree.items()}


def from_hf(tensors: dict[str, np.ndarray], cfg: ModelConfig, fam: str) -> dict:
  """The inverse of `to_hf`: a pure-dict model state (parameters only) of the model `cfg`."""
  d, h, g, k = cfg.d_model, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
  used = set()

  def take(name: str) -> np.ndarray:
    if name not in tensors:
      raise ExportError(f'model.safetensors has no tensor {name!r}')
    used.add(name)
    return np.asarray(tensors[name])

  def unlinear(name: str, shape: tuple[int, ...]) -> np.ndarray:
    w = take(name)
    if w.ndim != 2 or w.size != np.prod(shape):
      raise ExportError(f'{name}: shape {w.shape} does not fit config.json (our {shape})')
    return np.ascontiguousarray(w.T).reshape(shape)

  layers = []
  for i, spec in enumerate(cfg.layer_specs()):
    pre = f'model.layers.{i}.'
    attn = {
      'wq': unlinear(pre + 'self_attn.q_proj.weight', (d, h, k)),
      'wk': unlinear(pre + 'self_attn.k_proj.weight', (d, g, k)),
      'wv': unlinear(pre + 'self_attn.v_proj.weight', (d, g, k)),
      'wo': unlinear(pre + 'self_attn.o_proj.weight', (h, k, d)),
    }
    if cfg.attention.qk_norm:
      for name, n in (('q_norm', h), ('k_norm', g)):
        scale = take(pre + f'self_attn.{name}.weight')
        if scale.shape != (n * k,):
          raise ExportError(
            f'{pre}self_attn.{name}.weight: shape {scale.shape}, expected {(n * k,)}'
          )
        attn[name] = scale.reshape(n, k)
    if spec.feed_forward == 'mlp':
      f = cfg.mlp_dim
      mlp = {
        'w_gate': unlinear(pre + 'mlp.gate_proj.weight', (d, f)),
        'w_up': unlinear(pre + 'mlp.up_proj.weight', (d, f)),
        'w_down': unlinear(pre + 'mlp.down_proj.weight', (f, d)),
      }
    else:
      f, e_count = cfg.moe.hidden(cfg.mlp_dim), cfg.moe.num_experts
      router, experts, names = _moe_names(fam, pre)
      shapes = {'w_gate': (d, f), 'w_up': (d, f), 'w_down': (f, d)}
      mlp = {'router': unlinear(router, (d, e_count))}
      for ours, theirs in zip(shapes, names):
        mlp[ours] = np.stack(
          [unlinear(f'{experts}{e}.{theirs}.weight', shapes[ours]) for e in range(e_count)]
        )
      if fam == 'qwen2_moe':
        for name in _zero_shared_expert(pre, d):
          if take(name).size and name.endswith('_proj.weight'):
            raise ExportError(f'{name}: a shared expert (sigmoid-gated) is not implemented')
    layers.append(
      {
        'attn_norm': {'scale': take(pre + 'input_layernorm.weight')},
        'attn': attn,
        'mlp_norm': {'scale': take(pre + 'post_attention_layernorm.weight')},
        'mlp': mlp,
      }
    )
  state = {
    'embed': {'embedding': take('model.embed_tokens.weight')},
    'stages': plan.stage_states(layers, cfg),
    'final_norm': {'scale': take('model.norm.weight')},
  }
  if not cfg.tie_embeddings:
    state['head'] = unlinear('lm_head.weight', (d, cfg.vocab_size))
  extra = sorted(set(tensors) - used - {'lm_head.weight'})
  if extra:
    raise ExportError(
      f'model.safetensors has tensors this architecture does not use: {extra[0]}, ...'
    )
  return state
