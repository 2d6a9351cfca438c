"""Decoder-only transformer: embedding, a stack of blocks (scanned or looped), final norm, head.

`Transformer(cfg, rngs=...)(tokens_BL) -> (logits_BLV, aux)`: logits are f32 whatever the compute
dtype; aux is {'loss': f32 scalar summed over layers, 'metrics': {'layer_{i}/name': scalar}}.

With `cfg.scan_layers` the blocks live in one `Block` whose parameters carry a leading [num_layers]
axis (logical name 'layers'), created by `nnx.vmap` and applied by `nnx.scan`: one compiled body
whatever the depth. Otherwise they are an `nnx.List` applied by a Python loop.

Under raw jax transforms (jax.jit, jax.grad, ...) merge the model inside the transformed function:
nnx.scan refuses Variables created at an outer trace level. nnx.jit / nnx.grad need nothing special.
"""

import jax
import jax.numpy as jnp
from flax import nnx

from model import axes
from model.block import RESIDUAL, Block
from model.config import ModelConfig
from model.layers import Embedding, RMSNorm, init_normal

_POLICIES = {
    'full': None,  # jax.checkpoint with no policy saves nothing: recompute the whole block
    'save_dots': jax.checkpoint_policies.checkpoint_dots,
    'save_dots_no_batch': jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
}


def _block_fn(remat: str, *, prevent_cse: bool):
  """block(x, positions, segment_ids) -> (x, aux), rematerialised according to `remat`."""

  def apply(block, x_BLD, positions_BL, segment_ids_BL):
    return block(x_BLD, positions_BL, segment_ids_BL)

  if remat == 'none':
    return apply
  return nnx.remat(apply, policy=_POLICIES[remat], prevent_cse=prevent_cse)


def _layer_metrics(metrics: dict, i: int) -> dict:
  return {f'layer_{i}/{name}': value for name, value in metrics.items()}


class Transformer(nnx.Module):
  """The dense decoder-only language model."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    self.embed = Embedding(cfg, rngs=rngs)
    if cfg.scan_layers:
      # Graph mode (flax's default in 0.12.8 and 0.12.12) is needed: in tree mode nnx.vmap ignores
      # transform_metadata and the stacked params would lack their leading 'layers' name.
      @nnx.split_rngs(splits=cfg.num_layers)
      @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: 'layers'})
      def make_blocks(rngs: nnx.Rngs) -> Block:
        return Block(cfg, rngs=rngs)

      self.blocks = make_blocks(rngs)
    else:
      self.blocks = nnx.List([Block(cfg, rngs=rngs) for _ in range(cfg.num_layers)])
    self.final_norm = RMSNorm(cfg, rngs=rngs)
    if not cfg.tie_embeddings:
      self.head = axes.param(rngs, init_normal(cfg), (cfg.d_model, cfg.vocab_size),
                             ('embed', 'vocab'), cfg.param_dtype)

  def __call__(self, tokens_BL: jax.Array, *, positions_BL: jax.Array | None = None,
               segment_ids_BL: jax.Array | None = None) -> tuple[jax.Array, dict]:
    """Logits [B, L, V] in f32 and the aux dict; positions default to 0..L-1 in every row."""
    return self.from_embeddings(self.embed(tokens_BL), positions_BL=positions_BL,
                                segment_ids_BL=segment_ids_BL)

  def from_embeddings(self, x_BLD: jax.Array, *, positions_BL: jax.Array | None = None,
                      segment_ids_BL: jax.Array | None = None) -> tuple[jax.Array, dict]:
    """Everything after the token lookup; a float entry point (gradients w.r.t. the input)."""
    b, l = x_BLD.shape[:2]
    if positions_BL is None:
      positions_BL = jnp.broadcast_to(jnp.arange(l, dtype=jnp.int32), (b, l))
    x_BLD = axes.constrain(x_BLD.astype(self.cfg.dtype), RESIDUAL)
    if self.cfg.scan_layers:
      x_BLD, aux = self._scan_blocks(x_BLD, positions_BL, segment_ids_BL)
    else:
      x_BLD, aux = self._loop_blocks(x_BLD, positions_BL, segment_ids_BL)
    x_BLD = self.final_norm(x_BLD)
    if self.cfg.tie_embeddings:
      logits_BLV = self.embed.attend(x_BLD)
    else:
      logits_BLV = jnp.einsum('bld,dv->blv', x_BLD, self.head[...].astype(self.cfg.dtype),
                              preferred_element_type=jnp.float32)
    logits_BLV = axes.constrain(logits_BLV.astype(jnp.float32), ('batch', 'length', 'act_vocab'))
    return logits_BLV, aux

  def _loop_blocks(self, x_BLD, positions_BL, segment_ids_BL):
    block_fn = _block_fn(self.cfg.remat, prevent_cse=True)
    loss = jnp.zeros((), jnp.float32)
    metrics = {}
    for i, block in enumerate(self.blocks):
      x_BLD, aux = block_fn(block, x_BLD, positions_BL, segment_ids_BL)
      loss = loss + aux['loss']
      metrics.update(_layer_metrics(aux['metrics'], i))
    return x_BLD, {'loss': loss, 'metrics': metrics}

  def _scan_blocks(self, x_BLD, positions_BL, segment_ids_BL):
    # Inside a scan, CSE cannot merge the recomputation with the forward pass; see jax.checkpoint.
    block_fn = _block_fn(self.cfg.remat, prevent_cse=False)

    @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=(nnx.Carry, 0),
              transform_metadata={nnx.PARTITION_NAME: 'layers'})
    def step(x_BLD, block):
      return block_fn(block, x_BLD, positions_BL, segment_ids_BL)

    x_BLD, aux_L = step(x_BLD, self.blocks)
    metrics = {}
    for i in range(self.cfg.num_layers):
      metrics.update(_layer_metrics({k: v[i] for k, v in aux_L['metrics'].items()}, i))
    return x_BLD, {'loss': jnp.sum(aux_L['loss']), 'metrics': metrics}


def count_params(cfg: ModelConfig) -> int:
  """Exact number of learned parameters (nnx.Param), from an abstract (eval_shape) model."""
  abstract = nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0)))
  leaves = jax.tree.leaves(nnx.state(abstract, nnx.Param))
  return int(sum(leaf.size for leaf in leaves))


def matmul_params(cfg: ModelConfig) -> int:
  """Weights that take part in a matmul per token: attention and MLP projections, and the output
  head (D*V, tied or not); norms and the embedding lookup are excluded."""
  d, k = cfg.d_model, cfg.head_dim
  attn = d * cfg.num_heads * k * 2 + d * cfg.num_kv_heads * k * 2
  mlp = 3 * d * cfg.mlp_dim
  return cfg.num_layers * (attn + mlp) + d * cfg.vocab_size


def flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
  """Training FLOPs per token, the PaLM (Chowdhery et al. 2022, App. B) MFU accounting.

  6 * N + 12 * L * D * S: each matmul weight costs 2 FLOPs forward and 4 backward per token (N =
  `matmul_params`), and attention scores plus the weighted sum cost 2 * 2 * D * S forward per layer,
  times 3 for backward. Causal masking is not discounted (the standard convention), and
  rematerialised recomputation is not counted (MFU, not HFU).
  """
  return 6.0 * matmul_params(cfg) + 12.0 * cfg.num_layers * cfg.d_model * seq_len
