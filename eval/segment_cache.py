"""Segment cache hit: how local a MoE layer's routing is, on held-out text.

An offloaded MoE keeps a few experts in fast memory. For each MoE layer and segment length n we
cut every held-out sequence into consecutive non-overlapping windows of n tokens (windows never
cross a sequence boundary; a trailing partial window is left out) and ask:

- `segment_cache_hit`: the fraction of segments whose tokens, together, use at most `cache_size`
  distinct experts (the whole segment runs from the cache);
- `segment_best_hit_rate`: per segment, the share of its token→expert activations served by the
  `cache_size` experts it uses most (the best a cache fixed for the segment can do), averaged over
  segments; a segment with no activations counts as fully served.

The cache holds 2·k experts, k = `moe.top_k`. Expert choice has no per-token k: its tokens use
E·C/L experts on average (C = `model.capacity.capacity`, about `capacity_factor`), which the
report gives as `experts_per_token`; the cache is still 2·`moe.top_k` so runs compare at one size.

Assignments are the experts that actually ran (`MoE`'s aux['stats']['assign_BLE']): after the
loss-free bias, without assignments dropped by capacity execution, and for expert choice the
experts that picked the token. `checkpoint_segment_cache` restores a run's checkpoint on one device
(like eval/sample.py) and measures the first `max_batches` held-out batches.
"""

import jax
import numpy as np
from flax import nnx

from configs import schema
from data import corpus, pipeline
from eval import evaluate
from model.config import ConfigError


def _segment_counts(assign_BLE, segment_len: int, cache_size: int) -> np.ndarray:
  """Activations per expert of every full segment, [segments, E]; checks the arguments."""
  assign_BLE = np.asarray(assign_BLE)
  if assign_BLE.ndim != 3:
    raise ValueError(f'assign_BLE has shape {assign_BLE.shape}: expected [batch, length, experts]')
  if segment_len < 1 or cache_size < 1:
    raise ValueError(f'segment_len={segment_len}, cache_size={cache_size}: expected both >= 1')
  b, l, e = assign_BLE.shape
  segments = l // segment_len
  if b == 0 or segments == 0:
    raise ValueError(
      f'no full segment of {segment_len} tokens in assignments of shape {assign_BLE.shape}'
    )
  used_BSNE = assign_BLE[:, : segments * segment_len].reshape(b, segments, segment_len, e)
  return used_BSNE.astype(np.int64).sum(axis=2).reshape(b * segments, e)


def segment_cache_hit(assign_BLE, segment_len: int, cache_size: int) -> float:
  """Fraction of segments whose tokens use at most `cache_size` distinct experts."""
  counts_SE = _segment_counts(assign_BLE, segment_len, cache_size)
  return float(np.mean((counts_SE > 0).sum(axis=-1) <= cache_size))


def segment_best_hit_rate(assign_BLE, segment_len: int, cache_size: int) -> float:
  """Mean over segments of the share of activations served by the segment's top-`cache_size`
  experts (by use in that segment)."""
  counts_SE = _segment_counts(assign_BLE, segment_len, cache_size)
  served_S = -np.sort(-counts_SE, axis=-1)[:, :cache_size].sum(axis=-1)
  total_S = counts_SE.sum(axis=-1)
  return float(np.mean(np.where(total_S > 0, served_S / np.maximum(total_S, 1), 1.0)))


def layer_assignments(model):
  """A function tokens_BL -> {MoE layer index: assign_BLE} running `model` (an nnx Transformer);
  compiled once per input shape."""
  graphdef, state = nnx.split(model)

  @jax.jit
  def run(state, tokens_BL):
    merged = nnx.merge(graphdef, state)
    _, aux = merged(tokens_BL)
    return {
      i: s['mlp']['assign_BLE']
      for i, s in merged.layer_stats(aux['stats']).items()
      if 'assign_BLE' in s.get('mlp', {})
    }

  return lambda tokens_BL: {i: np.asarray(a) for i, a in run(state, tokens_BL).items()}


def model_segment_cache(model, batches, *, cache_size: int, lengths=(8, 32)) -> dict[int, dict]:
  """Per MoE layer: segment cache hit and best hit rate per length, and experts per token, over
  `batches` (token arrays [B, L]); {} for a model without MoE layers."""
  assignments = layer_assignments(model)
  per_layer = {}
  for tokens_BL in batches:
    for i, assign_BLE in assignments(tokens_BL).items():
      per_layer.setdefault(i, []).append(assign_BLE)
  out = {}
  for i, parts in sorted(per_layer.items()):
    assign_BLE = np.concatenate(parts)
    row = {'experts_per_token': float(assign_BLE.sum(-1).mean())}
    for n in lengths:
      row[f'segment_cache_hit_{n}'] = segment_cache_hit(assign_BLE, n, cache_size)
      row[f'segment_best_hit_rate_{n}'] = segment_best_hit_rate(assign_BLE, n, cache_size)
    out[i] = row
  return out


def checkpoint_segment_cache(
  workdir: str, step: int | None = None, lengths=(8, 32), max_batches: int = 4
) -> dict:
  """{'step', 'cache_size', 'layers': {layer: metrics}} of a run's checkpoint (default: newest)
  on the first `max_batches` held-out batches of `eval.batch_size` sequences."""
  cfg = evaluate.read_run_config(workdir)
  _check(cfg, lengths, max_batches)
  cfg, step, model = evaluate.restore_model(workdir, step)
  return {'step': step, **heldout_segment_cache(cfg, model, lengths, max_batches)}


def _check(cfg: schema.Config, lengths, max_batches: int) -> None:
  bad = [n for n in lengths if not 1 <= n <= cfg.train.seq_len]
  if bad or max_batches < 1:
    raise ConfigError(
      f'lengths={tuple(lengths)}, max_batches={max_batches}: expected segment '
      f'lengths in 1..train.seq_len={cfg.train.seq_len} and max_batches >= 1'
    )


def heldout_segment_cache(cfg: schema.Config, model, lengths=(8, 32), max_batches: int = 4) -> dict:
  """{'cache_size', 'layers'} of `model` (the run of `cfg`) on its first held-out batches."""
  _check(cfg, lengths, max_batches)
  tokens = corpus.load_split(corpus.resolve_dataset(cfg.data), 'heldout')
  batches = [
    b['inputs']
    for b in pipeline.eval_batches(
      tokens, seq_len=cfg.train.seq_len, batch_size=cfg.eval.batch_size, max_batches=max_batches
    )
  ]
  if not batches:
    raise corpus.DataError(
      f'held-out split has fewer than {cfg.eval.batch_size} sequences of '
      f'{cfg.train.seq_len + 1} tokens; nothing to measure'
    )
  cache_size = 2 * cfg.model.moe.top_k
  return {
    'cache_size': cache_size,
    'layers': model_segment_cache(model, batches, cache_size=cache_size, lengths=lengths),
  }
