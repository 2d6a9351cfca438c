"""Input pipelines over fixed-length windows of a flat token array.

Training (`train_dataset`) is a grain pipeline whose order is fixed by the seed alone:

  MapDataset.source(WindowSource) -> shuffle -> repeat(None) -> [process_index::process_count]
  -> map(to inputs/targets) -> batch(global // process_count) -> to_iter_dataset [-> mp_prefetch]

Every epoch is a fresh permutation of all windows (grain folds the epoch into the shuffle seed);
slicing after `repeat` deals the global stream round-robin to processes, so processes see
disjoint windows and together exactly the single-process stream.

Checkpointing: `it = iter(train_dataset(...))` is a `grain.DatasetIterator` with
`get_state() -> dict` / `set_state(dict)`. With Orbax save it as
`ocp.args.Composite(state=..., data=grain.checkpoint.CheckpointSave(it))` and restore with
`ocp.args.Composite(state=..., data=grain.checkpoint.CheckpointRestore(it))` on a fresh
iterator of the same pipeline; it then yields exactly the next batch (one JSON file per process).

Evaluation (`eval_batches`) reads held-out windows in order without shuffling, so every run of
an evaluation sees the same tokens.
"""

import mmap
from typing import Iterator

import grain
import jax
import numpy as np

from data.corpus import DataError


class WindowSource:
  """Random-access source: record i is tokens[i*L : i*L + L + 1] as int32 (inputs plus 1 target).

  Memory-mapped arrays are pickled as (file, offset, shape) so grain workers map the file
  themselves instead of receiving a copy of the corpus.
  """

  def __init__(self, tokens: np.ndarray, seq_len: int):
    if seq_len <= 0:
      raise ValueError(f'seq_len={seq_len}: expected a positive value')
    self.tokens = tokens
    self.seq_len = seq_len
    self._len = max(len(tokens) - 1, 0) // seq_len

  def __len__(self) -> int:
    return self._len

  def __getitem__(self, index: int) -> np.ndarray:
    if not 0 <= index < self._len:
      raise IndexError(f'window {index} out of range for {self._len} windows')
    start = index * self.seq_len
    return np.asarray(self.tokens[start:start + self.seq_len + 1], dtype=np.int32)

  def __getstate__(self):
    state = dict(self.__dict__)
    t = self.tokens
    if isinstance(t, np.memmap) and isinstance(t.base, mmap.mmap) and t.filename:  # not a view
      state['tokens'] = ('memmap', t.filename, t.offset, t.dtype.str, t.shape)
    return state

  def __setstate__(self, state):
    t = state['tokens']
    if isinstance(t, tuple) and t[0] == 'memmap':
      _, filename, offset, dtype, shape = t
      state['tokens'] = np.memmap(filename, dtype=dtype, mode='r', offset=offset, shape=shape)
    self.__dict__.update(state)

  def __repr__(self) -> str:
    return f'WindowSource(windows={self._len}, seq_len={self.seq_len})'


def split_window(window: np.ndarray) -> dict:
  """[L+1] window -> {'inputs': first L, 'targets': last L} (targets are inputs shifted by one)."""
  return {'inputs': window[:-1], 'targets': window[1:]}


def shuffle_seed(seed: int) -> int:
  """Scrambles the user seed: grain shuffles epoch e with seed+e, so raw seeds s and s+1 would
  share all but one epoch's order."""
  if seed < 0:
    raise ValueError(f'data seed={seed}: expected a non-negative integer')
  return int(np.random.SeedSequence([seed, 0x5EED]).generate_state(1)[0])


def train_dataset(tokens: np.ndarray, *, seq_len: int, global_batch_size: int, seed: int,
                  process_index: int, process_count: int, worker_count: int = 0,
                  prefetch: int = 2, read_threads: int = 0) -> grain.IterDataset:
  """Infinite shuffled batches {'inputs', 'targets'}: int32[global_batch_size // process_count, L].

  `worker_count > 0` adds grain worker processes (spawned: entry points need a __main__ guard);
  `read_threads > 0` reads up to max(prefetch, read_threads) batches ahead in threads (0 = in the
  consuming thread, which measured fastest for in-memory or memory-mapped tokens).
  """
  if global_batch_size <= 0 or global_batch_size % process_count:
    raise ValueError(f'global_batch_size={global_batch_size} must be a positive multiple of '
                     f'process_count={process_count}')
  if not 0 <= process_index < process_count:
    raise ValueError(f'process_index={process_index}: expected 0 <= index < {process_count}')
  src = WindowSource(tokens, seq_len)
  if len(src) == 0:
    raise DataError(f'{len(tokens)} tokens hold no window of seq_len={seq_len} (+1 target)')
  ds = grain.MapDataset.source(src).shuffle(seed=shuffle_seed(seed)).repeat(None)
  ds = ds[process_index::process_count].map(split_window)
  ds = ds.batch(global_batch_size // process_count, drop_remainder=True)
  buffer = max(prefetch, read_threads) if read_threads else 0
  out = ds.to_iter_dataset(grain.ReadOptions(num_threads=read_threads, prefetch_buffer_size=buffer))
  if worker_count > 0:
    out = out.mp_prefetch(grain.MultiprocessingOptions(
        num_workers=worker_count, per_worker_buffer_size=prefetch))
  return out


def eval_batches(tokens: np.ndarray, *, seq_len: int, batch_size: int, max_batches: int = 0,
                 process_index: int = 0, process_count: int = 1) -> Iterator[dict]:
  """Held-out batches in order: non-overlapping windows from the start, full batches only.

  At most `max_batches` batches (0 = all). With several processes each gets its rows
  [p * B/n, (p+1) * B/n) of every global batch, in the same order.
  """
  if batch_size <= 0 or batch_size % process_count:
    raise ValueError(f'batch_size={batch_size} must be a positive multiple of process_count={process_count}')
  src = WindowSource(tokens, seq_len)
  n = len(src) // batch_size
  if max_batches:
    n = min(n, max_batches)
  rows = batch_size // process_count
  for b in range(n):
    first = b * batch_size + process_index * rows
    windows = np.stack([src[i] for i in range(first, first + rows)])
    yield {'inputs': windows[:, :-1], 'targets': windows[:, 1:]}


def make_global_batch(local_batch: dict, sharding: jax.sharding.NamedSharding) -> dict:
  """This process's rows -> global jax.Arrays laid out by `sharding` (batch dim over processes)."""
  return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, x), local_batch)
