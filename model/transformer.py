"""Decoder-only transformer: embedding, stages of layers (scanned or looped), final norm, head.

`Transformer(cfg, rngs=...)(tokens_BL) -> (logits_BLV, aux)`: logits are f32 whatever the compute
dtype; aux is {'loss': f32 scalar summed over layers, 'metrics': {'layer_{i}/name': scalar},
'stats': per-stage statistics for `update_state`}.

Consecutive layers with the same `LayerSpec` form one `Stage` (one scan). A dense model is one
stage; routed layers in some positions split it.

Which layers are built, and whether the model is causal, comes from the layer plan
(`model.plan.build`): `Transformer.causal` is True when no layer kind declares that its output at t
can depend on tokens after t. Segment id 0 marks tokens that are not there (`model.validity`),
which is how a non-causal model is run on an exact prefix.

Under raw jax transforms (jax.jit, jax.grad, ...) merge the model inside the transformed function:
nnx.scan refuses Variables created at an outer trace level. nnx.jit / nnx.grad need nothing special.
"""

import itertools

import jax
import jax.numpy as jnp
from flax import nnx

from model import axes, entropy_trigger, plan
from model.config import ModelConfig
from model.layers import Embedding, RMSNorm, init_normal
from model.stage import Stage


class Transformer(nnx.Module):
  """The dense decoder-only language model."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    self.embed = Embedding(cfg, rngs=rngs)
    stages, first = [], 0
    for spec, run in itertools.groupby(plan.build(cfg).specs):
      count = len(list(run))
      stages.append(Stage(cfg, spec, first, count, rngs=rngs))
      first += count
    self.stages = nnx.List(stages)
    self.final_norm = RMSNorm(cfg, rngs=rngs)
    if not cfg.tie_embeddings:
      self.head = axes.param(
        rngs, init_normal(cfg), (cfg.d_model, cfg.vocab_size), ('embed', 'vocab'), cfg.param_dtype
      )

  @property
  def causal(self) -> bool:
    """Whether the logits at t depend on tokens <= t only (derived from the layer kinds)."""
    return plan.build(self.cfg).causal

  def __call__(
    self,
    tokens_BL: jax.Array,
    *,
    positions_BL: jax.Array | None = None,
    segment_ids_BL: jax.Array | None = None,
  ) -> tuple[jax.Array, dict]:
    """Logits [B, L, V] in f32 and the aux dict; positions default to 0..L-1 in every row."""
    return self.from_embeddings(
      self.embed(tokens_BL), positions_BL=positions_BL, segment_ids_BL=segment_ids_BL
    )

  def from_embeddings(
    self,
    x_BLD: jax.Array,
    *,
    positions_BL: jax.Array | None = None,
    segment_ids_BL: jax.Array | None = None,
  ) -> tuple[jax.Array, dict]:
    """Everything after the token lookup; a float entry point (gradients w.r.t. the input)."""
    b, l = x_BLD.shape[:2]
    if positions_BL is None:
      positions_BL = jnp.broadcast_to(jnp.arange(l, dtype=jnp.int32), (b, l))
    x_BLD = axes.constrain(x_BLD.astype(self.cfg.dtype), axes.RESIDUAL)
    loss, metrics, stats = jnp.zeros((), jnp.float32), {}, []
    for stage in self.stages:
      x_BLD, aux = stage(x_BLD, positions_BL, segment_ids_BL)
      loss, metrics = loss + aux['loss'], {**metrics, **aux['metrics']}
      stats.append(aux['stats'])
    aux = {'loss': loss, 'metrics': metrics, 'stats': stats}
    x_BLD = self.final_norm(x_BLD)
    if self.cfg.tie_embeddings:
      logits_BLV = self.embed.attend(x_BLD)
    else:
      logits_BLV = jnp.einsum(
        'bld,dv->blv',
        x_BLD,
        self.head[...].astype(self.cfg.dtype),
        preferred_element_type=jnp.float32,
      )
    logits_BLV = axes.constrain(logits_BLV.astype(jnp.float32), ('batch', 'length', 'act_vocab'))
    return logits_BLV, aux

  def update_state(self, stats: list) -> None:
    """Updates every routed layer's non-gradient state from the forward pass's `aux['stats']`.

    With `entropy.mode='global'` every entropy monitor first gets the mean H_tok over all
    monitored layers, so all layers trigger together (see `entropy_trigger.share_across_layers`).
    """
    if self.cfg.entropy.enabled and self.cfg.entropy.mode == 'global':
      stats = entropy_trigger.share_across_layers(stats)
    for stage, stage_stats in zip(self.stages, stats):
      stage.update_state(stage_stats)

  def layer_stats(self, stats: list) -> dict[int, dict]:
    """`aux['stats']` as {layer index: that layer's stats} (layers without stats left out)."""
    out = {}
    for stage, stage_stats in zip(self.stages, stats):
      out.update(stage.layer_stats(stage_stats))
    return out
