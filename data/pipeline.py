"""Input pipelines: shuffled training batches (windows or packed documents) and eval batches.

Training (`train_dataset`) is a grain pipeline over record *indices*, whose order is fixed by the
seed alone; the records of a batch are read together (one batched TensorStore read):

  windows: MapDataset.range(W).shuffle(seed).repeat(None)  } -> [process_index::process_count]
  packing: MapDataset.range(maxsize) (epoch = index // R)  }    -> batch(B / processes)
           -> map(source.read_batch) -> to_iter_dataset [-> mp_prefetch(workers)]

Windows (`data.packing=False`) are fixed L+1 token slices that cross document boundaries; every
epoch is a fresh permutation of them. Packing (`data.packing=True`) gives rows of whole-document
pieces with `segment_ids`, `positions` and `weights` (see `sources.PackedSource`), so attention
never crosses a document. Slicing after the index stream deals it round-robin to processes:
processes see disjoint records and together exactly the single-process stream.

Checkpointing: `it = iter(train_dataset(tokens, cfg.data, ...))` is a `grain.DatasetIterator` whose state is the
next index. With Orbax save it as `ocp.args.Composite(..., data=grain.checkpoint.CheckpointSave(it))`
and restore with `CheckpointRestore(it)` on a fresh iterator of the same pipeline; it then
yields exactly the next batch (one JSON file per process).

Evaluation (`eval_batches`) reads held-out windows in order without shuffling.
"""

import sys
from typing import Iterator

import grain
import jax
import numpy as np

from configs.schema import DataConfig
from data.errors import DataError
from data.sources import PackedSource, Split, WindowSource

__all__ = [
  'WindowSource',
  'PackedSource',
  'split_window',
  'train_dataset',
  'seek',
  'eval_batches',
  'make_global_batch',
  'shuffle_seed',
]


def split_window(window: np.ndarray) -> dict:
  """[..., L+1] windows -> {'inputs': first L, 'targets': last L} (targets shifted by one)."""
  return {'inputs': window[..., :-1], 'targets': window[..., 1:]}


def shuffle_seed(seed: int) -> int:
  """Scrambles the user seed: grain shuffles epoch e with seed+e, so raw seeds s and s+1 would
  share all but one epoch's order."""
  if seed < 0:
    raise ValueError(f'data seed={seed}: expected a non-negative integer')
  return int(np.random.SeedSequence([seed, 0x5EED]).generate_state(1)[0])


class _ReadWindows:
  """Batch of window indices -> {'inputs', 'targets'} (a class so it pickles to workers)."""

  def __init__(self, source: WindowSource):
    self.source = source

  def __call__(self, indices):
    return split_window(self.source.read_batch(indices))


def train_dataset(
  tokens,
  data_cfg: DataConfig,
  *,
  seq_len: int,
  global_batch_size: int,
  process_index: int = 0,
  process_count: int = 1,
) -> grain.IterDataset:
  """Infinite shuffled batches of int32[global_batch_size // process_count, L] arrays.

  `tokens` is a `sources.Split`, a `sources.TokenArray` or a numpy array. Of `data_cfg`: `seed`
  fixes the order; windows give {'inputs', 'targets'}, `packing` also gives 'segment_ids',
  'positions' and f32 'weights' and needs the document offsets of a Split; `worker_count > 0`
  adds grain worker processes (spawned: entry points need a __main__ guard); `read_threads > 0`
  reads up to max(prefetch, read_threads) batches ahead in threads.
  """
  if global_batch_size <= 0 or global_batch_size % process_count:
    raise ValueError(
      f'global_batch_size={global_batch_size} must be a positive multiple of '
      f'process_count={process_count}'
    )
  if not 0 <= process_index < process_count:
    raise ValueError(f'process_index={process_index}: expected 0 <= index < {process_count}')
  seed, read_threads, prefetch = data_cfg.seed, data_cfg.read_threads, data_cfg.prefetch
  tokens, offsets = (tokens.tokens, tokens.offsets) if isinstance(tokens, Split) else (tokens, None)
  if data_cfg.packing:
    if offsets is None:
      raise ValueError('data.packing=True needs document offsets (pass a sources.Split)')
    src = PackedSource(tokens, offsets, seq_len, seed=shuffle_seed(seed))
    if len(src) == 0:
      raise DataError(f'{len(offsets) - 1} documents hold no (input, target) pair to pack')
    ds, read = grain.MapDataset.range(sys.maxsize), src.read_batch
  else:
    src = WindowSource(tokens, seq_len)
    if len(src) == 0:
      raise DataError(f'{len(tokens)} tokens hold no window of seq_len={seq_len} (+1 target)')
    ds = grain.MapDataset.range(len(src)).shuffle(seed=shuffle_seed(seed)).repeat(None)
    read = _ReadWindows(src)
  ds = ds[process_index::process_count]
  ds = ds.batch(global_batch_size // process_count, drop_remainder=True).map(read)
  buffer = max(prefetch, read_threads) if read_threads else 0
  out = ds.to_iter_dataset(grain.ReadOptions(num_threads=read_threads, prefetch_buffer_size=buffer))
  if data_cfg.worker_count > 0:
    out = out.mp_prefetch(
      grain.MultiprocessingOptions(
        num_workers=data_cfg.worker_count, per_worker_buffer_size=prefetch
      )
    )
  return out


def seek(iterator: grain.DatasetIterator, batches: int) -> None:
  """Moves a fresh `train_dataset` iterator to batch number `batches` of its stream.

  Every step consumes the same global records whatever the process count, so a checkpoint
  written by P processes resumes on P' processes by seeking each to the checkpoint's step.
  """
  state = iterator.get_state()
  if set(state) != {'next_index'}:
    raise DataError(
      'resuming on a different number of processes needs data.worker_count=0 '
      f'(the iterator state {sorted(state)} cannot be repositioned)'
    )
  iterator.set_state({'next_index': batches})


def eval_batches(
  tokens,
  *,
  seq_len: int,
  batch_size: int,
  max_batches: int = 0,
  process_index: int = 0,
  process_count: int = 1,
) -> Iterator[dict]:
  """Held-out batches in order: non-overlapping windows from the start, full batches only.

  At most `max_batches` batches (0 = all). With several processes each gets its rows
  [p * B/n, (p+1) * B/n) of every global batch, in the same order.
  """
  if batch_size <= 0 or batch_size % process_count:
    raise ValueError(
      f'batch_size={batch_size} must be a positive multiple of process_count={process_count}'
    )
  if isinstance(tokens, Split):
    tokens = tokens.tokens
  src = WindowSource(tokens, seq_len)
  n = len(src) // batch_size
  if max_batches:
    n = min(n, max_batches)
  rows = batch_size // process_count
  for b in range(n):
    first = b * batch_size + process_index * rows
    yield split_window(src.read_batch(np.arange(first, first + rows)))


def make_global_batch(local_batch: dict, sharding: jax.sharding.NamedSharding) -> dict:
  """This process's rows -> global jax.Arrays laid out by `sharding` (batch dim over processes)."""
  return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, x), local_batch)
