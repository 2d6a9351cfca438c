"""A lower bound on a training run's memory, checked before anything is compiled or allocated.

A config far beyond the machine's memory would otherwise trace, compile for minutes and die in the
allocator. `check(cfg, num_devices)` refuses it in one line instead: parameters and optimizer state
come exact from `eval_shape` of the real construction, activations from an analytic lower bound.
"""

import dataclasses
import os

import jax
import jax.numpy as jnp
from flax import nnx

from configs.schema import Config, ConfigError
from model import plan
from model.attention import attention_impl
from model.chunked_attention import scored_pairs
from model.config import LayerSpec
from train.step import _build

_GiB = 1 << 30


def fmt_bytes(num_bytes: int) -> str:
  """Bytes in the largest binary unit that keeps the number >= 1 (GiB at most)."""
  for unit, size in (('GiB', _GiB), ('MiB', 1 << 20), ('KiB', 1 << 10)):
    if num_bytes >= size:
      return f'{num_bytes / size:.1f} {unit}'
  return f'{num_bytes} B'


@dataclasses.dataclass(frozen=True)
class MemoryEstimate:
  """Bytes a training step needs, every device together, by what holds them.

  `total` counts only what must be live at one instant: the state throughout, the activations at
  the end of the forward pass, all gradients at the update. Gradients and activations add up only
  when `overlap` (train.grad_accum > 1: the accumulated gradient is live during every micro-batch);
  otherwise the backward pass may free activations as it creates gradients, so the larger counts.
  """

  params: int  # the model state (parameters and non-gradient variables)
  optimizer: int  # the nnx.Optimizer state (step count, AdamW moments)
  gradients: int  # one gradient per trainable parameter
  activations: int  # the peak the backward pass keeps live (`activation_bytes`)
  num_devices: int
  overlap: bool = False

  @property
  def total(self) -> int:
    step_bytes = (
      self.gradients + self.activations if self.overlap else max(self.gradients, self.activations)
    )
    return self.params + self.optimizer + step_bytes

  @property
  def per_device(self) -> int:
    """`total` spread perfectly over the devices: a lower bound on any one device's share."""
    return -(-self.total // self.num_devices)

  def describe(self) -> str:
    grads, acts = (
      f'gradients {fmt_bytes(self.gradients)}',
      f'activations {fmt_bytes(self.activations)}',
    )
    step = f'{grads} + {acts}' if self.overlap else f'max({grads}, {acts})'
    return f'params {fmt_bytes(self.params)} + optimizer {fmt_bytes(self.optimizer)} + {step}'


def _tree_bytes(tree) -> int:
  return int(sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree)))


def state_bytes(cfg: Config) -> tuple[int, int, int]:
  """(model state, trainable parameters, optimizer state) in bytes, exact: `eval_shape` of the
  train step's own construction (`train.step._build`), so nothing is allocated or compiled."""
  model, opt = nnx.eval_shape(lambda: _build(cfg))
  return (
    _tree_bytes(nnx.state(model)),
    _tree_bytes(nnx.state(model, nnx.Param)),
    _tree_bytes(nnx.state(opt)),
  )


def _layer_terms(cfg: Config, spec: LayerSpec, batch: int) -> dict[str, int]:
  """Elements (of model.dtype) one layer's backward needs from its forward pass, by tensor.

  `resid` (block input) and `mid` (residual after attention) are the inputs of the two norms: one
  of input or output must be kept. A dense attention adds q/k/v and, with XLA attention, the
  probabilities B·H·L·L and the output (input of wo); chunked attention keeps only the scored
  pairs' probabilities (`chunked_attention.scored_pairs`); cuDNN flash attention keeps its output and
  B·H·L f32 softmax statistics instead (`flash`). The SwiGLU MLP adds gate and up (2·B·L·F).
  Other layer kinds (routing, local, SMHA, MoE, UoME) count only their input: a bound stays one.
  """
  m, seq_len = cfg.model, cfg.train.seq_len
  tokens, h, k = batch * seq_len, m.num_heads, m.head_dim
  terms = {'resid': tokens * m.d_model, 'mid': tokens * m.d_model}
  if spec.attention == 'dense':
    terms['qkv'] = tokens * (h + 2 * m.num_kv_heads) * k
    kernel = attention_impl(cfg.attention.impl, m.dtype)
    if kernel == 'cudnn':
      terms['flash'] = tokens * h * k + tokens * h * 4 // jnp.dtype(m.dtype).itemsize
    else:
      pairs = scored_pairs(seq_len) if kernel == 'chunked' else seq_len * seq_len
      terms['probs'], terms['attn_out'] = batch * h * pairs, tokens * h * k
  if spec.feed_forward == 'mlp':
    terms['hidden'] = 2 * tokens * m.mlp_dim
  return terms


# Terms each remat policy keeps for every layer; the others are live for one layer at a time
# (recomputed in its backward pass). The dots policies keep matmul outputs: the projections (q/k/v
# before RoPE, wo's output in place of `mid`, gate and up) and, for 'save_dots', the XLA attention
# logits (f32, in place of the probabilities) and output; cuDNN attention is a custom call.
_SAVED = {
  'none': ('resid', 'mid', 'qkv', 'probs', 'attn_out', 'flash', 'hidden'),
  'save_dots': ('resid', 'mid', 'qkv', 'probs', 'attn_out', 'hidden'),
  'save_dots_no_batch': ('resid', 'mid', 'qkv', 'hidden'),  # attention einsums have batch dims
  'full': ('resid',),  # jax.checkpoint without a policy: only the block's input
}


def activation_bytes(cfg: Config) -> int:
  """A lower bound on the activation bytes live at one instant of a step, over all devices.

  Per micro-batch of B = train.batch_size // train.grad_accum rows, in model.dtype: for every
  layer the terms its remat policy saves (`_SAVED`, sizes from `_layer_terms`), live together at
  the end of the forward pass and still when the last layer's backward starts. Added to them: the
  larger of the logits B·L·V in f32 (the loss runs in f32; live at the end of the forward pass) and
  the last layer's recomputed terms (live in its backward, when the logits may be gone). Norm
  outputs, RoPE temporaries, softmax copies, cotangents and XLA's fusion buffers are left out.
  """
  batch = cfg.train.batch_size // cfg.train.grad_accum
  saved = _SAVED[cfg.model.remat]
  kept = recomputed = 0
  for spec in plan.build(
    cfg.model
  ).specs:  # the last layer's recomputed terms remain in `recomputed`
    terms = _layer_terms(cfg, spec, batch)
    kept += sum(v for name, v in terms.items() if name in saved)
    recomputed = sum(v for name, v in terms.items() if name not in saved)
  itemsize = jnp.dtype(cfg.model.dtype).itemsize
  logits_bytes = batch * cfg.train.seq_len * cfg.model.vocab_size * 4
  return kept * itemsize + max(recomputed * itemsize, logits_bytes)


def estimate(cfg: Config, num_devices: int) -> MemoryEstimate:
  """A lower bound on a training step's memory, before any mesh, allocation or compilation.

  params and optimizer are exact (`state_bytes`); gradients are the trainable parameters' bytes
  (in param_dtype); activations are `activation_bytes`; `total` adds what coexists. `per_device`
  assumes every byte is sharded perfectly over `num_devices` devices (replication only adds), so
  it too is a lower bound. XLA's own rematerialisation under memory pressure is not foreseen.
  """
  model_bytes, param_bytes, opt_bytes = state_bytes(cfg)
  return MemoryEstimate(
    params=model_bytes,
    optimizer=opt_bytes,
    gradients=param_bytes,
    activations=activation_bytes(cfg),
    num_devices=num_devices,
    overlap=cfg.train.grad_accum > 1,
  )


def device_memory() -> tuple[int, str]:
  """(bytes one local device can use, where that number came from).

  An accelerator reports its allocator limit in `memory_stats()['bytes_limit']`; a CPU device
  reports nothing, and all CPU devices of a host share its physical RAM.
  """
  device = jax.local_devices()[0]
  stats = device.memory_stats() or {}
  if 'bytes_limit' in stats:
    return int(stats['bytes_limit']), f'{device.platform} memory_stats bytes_limit'
  return os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES'), 'host RAM'


def check(cfg: Config, num_devices: int) -> MemoryEstimate | None:
  """Raises ConfigError when even the lower bound `estimate` cannot fit this machine's memory.

  On an accelerator one device's share is compared with its limit; on CPU the local devices'
  shares together are compared with the host's RAM. Returns the estimate, or None (and estimates
  nothing) when train.check_memory is False.
  """
  if not cfg.train.check_memory:
    return None
  est = estimate(cfg, num_devices)
  limit_bytes, source = device_memory()
  local_devices = jax.local_device_count() if source == 'host RAM' else 1
  if est.per_device * local_devices <= limit_bytes:
    return est
  m, t = cfg.model, cfg.train
  model_fields = f'model.d_model={m.d_model}, model.num_layers={m.num_layers}'
  batch_fields = f'train.batch_size={t.batch_size}, train.seq_len={t.seq_len}'
  state_total = est.params + est.optimizer + est.gradients
  lead, rest = (
    (batch_fields, model_fields) if est.activations > state_total else (model_fields, batch_fields)
  )
  has = f'a device has {fmt_bytes(limit_bytes // local_devices)} ({source}'
  if local_devices > 1:
    has += f' {fmt_bytes(limit_bytes)} shared by {local_devices} local devices'
  raise ConfigError(
    f'{lead} ({rest}): training needs at least {fmt_bytes(est.per_device)} per device '
    f'({est.describe()}; a lower bound, perfect sharding over {num_devices} devices) but {has}); '
    'shrink the model or the batch (or raise train.grad_accum, use '
    "model.remat='full'), or set --config.train.check_memory=False to try anyway"
  )
