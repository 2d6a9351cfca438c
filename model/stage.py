"""A run of identical consecutive layers, applied by one scan (or a Python loop).

Layers with different specs (routing attention only in the last layers, MoE every n-th layer)
cannot share one scan; the transformer splits its layers into stages of equal specs instead.
With `cfg.scan_layers` a stage's parameters carry a leading [n] axis (logical name 'layers'),
created by `nnx.vmap` and applied by `nnx.scan`: one compiled body whatever the depth.
"""

import jax
import jax.numpy as jnp
from flax import nnx

from model.block import Block
from model.config import LayerSpec, ModelConfig

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


class Stage(nnx.Module):
  """Layers `first .. first + count - 1`, all of `spec`; returns (x, aux) like a Block."""

  def __init__(self, cfg: ModelConfig, spec: LayerSpec, first: int, count: int, *, rngs: nnx.Rngs):
    self.scan, self.first, self.count, self.remat = cfg.scan_layers, first, count, cfg.remat
    if cfg.scan_layers:
      # Graph mode (flax's default in 0.12.8 and 0.12.12) is needed: in tree mode nnx.vmap ignores
      # transform_metadata and the stacked params would lack their leading 'layers' name.
      @nnx.split_rngs(splits=count)
      @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: 'layers'})
      def make_blocks(rngs: nnx.Rngs) -> Block:
        return Block(cfg, spec, rngs=rngs)

      self.blocks = make_blocks(rngs)
    else:
      self.blocks = nnx.List([Block(cfg, spec, rngs=rngs) for _ in range(count)])

  def __call__(self, x_BLD, positions_BL, segment_ids_BL):
    if self.scan:
      return self._scan(x_BLD, positions_BL, segment_ids_BL)
    block_fn = _block_fn(self.remat, prevent_cse=True)
    loss, metrics, stats = jnp.zeros((), jnp.float32), {}, []
    for i, block in enumerate(self.blocks):
      x_BLD, aux = block_fn(block, x_BLD, positions_BL, segment_ids_BL)
      loss = loss + aux['loss']
      metrics.update(_layer_metrics(aux['metrics'], self.first + i))
      stats.append(aux['stats'])
    return x_BLD, {'loss': loss, 'metrics': metrics, 'stats': stats}

  def _scan(self, x_BLD, positions_BL, segment_ids_BL):
    # Inside a scan, CSE cannot merge the recomputation with the forward pass; see jax.checkpoint.
    block_fn = _block_fn(self.remat, prevent_cse=False)

    @nnx.scan(
      in_axes=(nnx.Carry, 0),
      out_axes=(nnx.Carry, 0),
      transform_metadata={nnx.PARTITION_NAME: 'layers'},
    )
    def step(x_BLD, block):
      return block_fn(block, x_BLD, positions_BL, segment_ids_BL)

    x_BLD, aux_L = step(x_BLD, self.blocks)
    metrics = {}
    for i in range(self.count):
      metrics.update(_layer_metrics({k: v[i] for k, v in aux_L['metrics'].items()}, self.first + i))
    return x_BLD, {'loss': jnp.sum(aux_L['loss']), 'metrics': metrics, 'stats': aux_L['stats']}

  def update_state(self, stats) -> None:
    """Per-layer state updates from the stats this stage returned (stacked in scan mode)."""
    if not jax.tree.leaves(stats):
      return
    if self.scan:

      @nnx.vmap(in_axes=(0, 0), out_axes=None, transform_metadata={nnx.PARTITION_NAME: 'layers'})
      def update(block, layer_stats):
        block.update_state(layer_stats)

      update(self.blocks, stats)
    else:
      for block, layer_stats in zip(self.blocks, stats):
        block.update_state(layer_stats)

  def layer_stats(self, stats) -> dict[int, dict]:
    """This stage's stats as {layer index: that layer's stats}, unstacked in scan mode."""
    if not jax.tree.leaves(stats):
      return {}
    if self.scan:
      return {self.first + i: jax.tree.map(lambda x: x[i], stats) for i in range(self.count)}
    return {self.first + i: s for i, s in enumerate(stats)}
