"""Random-access sources over a prepared dataset, for grain.

A prepared split `DIR/SPLIT/` holds `tokens` (a zarr3 TensorStore: one flat array of the
smallest sufficient unsigned type, every document followed by EOS) and `offsets.npy` (int64
[documents + 1]: document d is tokens[offsets[d]:offsets[d+1]]). The array is sharded (zarr3
`sharding_indexed`) into 4 Mi-token shards of 4 Ki-token inner chunks, so a random window reads
only the few KiB it needs. Every inner chunk is stored (also one equal to the fill value) with a
crc32c that TensorStore checks on each read, and reads of a missing chunk fail instead of
returning zeros: damage found while reading is a one-line DataError naming the file
(`data.verify` checks whole files before training).

Reads are fast only when many are in flight (docs/design.md §8: ~50 us each when issued together, ~200 us
one by one), so every source reads a whole batch at once (`read_batch(indices)`): all reads are
issued before the first `.result()`.

Sources work on a `TokenArray` (TensorStore) or any numpy array (tests, in-memory data).
"""

import dataclasses
import mmap

import numpy as np
import tensorstore as ts

from data import storage
from data.errors import DataError

SHARD_TOKENS = 1 << 22  # tokens per zarr3 shard file (one file on disk)
CHUNK_TOKENS = 1 << 12  # tokens per inner chunk (the unit a read fetches)
_CACHE_BYTES = 64 << 20  # TensorStore chunk cache per opened array


def token_spec(path: str) -> dict:
  """The zarr3 spec of the token array at `path` (a local directory, gs:// or s3://)."""
  return {'driver': 'zarr3', 'kvstore': storage.kvstore(path)}


def _damaged(path: str, error: Exception) -> DataError:
  detail = str(error).splitlines()[0] if str(error) else type(error).__name__
  return DataError(
    f'{path}: cannot read tokens ({detail[:300]}); the prepared dataset is damaged: '
    're-run python -m data.prepare'
  )


def create_token_array(path: str, size: int, dtype, crc32c: bool = True) -> ts.TensorStore:
  """A new (overwritten) zarr3 array of `size` tokens, sharded for random reads; `crc32c=False`
  (only for measuring what the checksum costs) stores the chunks without it."""
  spec = token_spec(path)
  spec['metadata'] = {
    'shape': [size],
    'data_type': np.dtype(dtype).name,
    'chunk_grid': {'name': 'regular', 'configuration': {'chunk_shape': [SHARD_TOKENS]}},
    'codecs': [
      {
        'name': 'sharding_indexed',
        'configuration': {
          'chunk_shape': [CHUNK_TOKENS],
          'codecs': [{'name': 'bytes', 'configuration': {'endian': 'little'}}]
          + ([{'name': 'crc32c'}] if crc32c else []),
        },
      }
    ],
  }
  spec['store_data_equal_to_fill_value'] = True  # every chunk on disk: a missing one is damage
  return ts.open(spec, create=True, delete_existing=True).result()


class TokenArray:
  """A read-only flat token array in TensorStore; pickles as its location (an absolute path or a
  gs:// / s3:// URL: each worker reopens it)."""

  def __init__(self, path: str):
    self.path = storage.resolve(path)
    self._store = None
    self._shape_dtype = None
    _ = self.store

  @property
  def store(self) -> ts.TensorStore:
    if self._store is None:
      spec = {
        **token_spec(self.path),
        'fill_missing_data_reads': False,
        'context': {'cache_pool': {'total_bytes_limit': _CACHE_BYTES}},
      }
      try:
        self._store = ts.open(spec, read=True).result()
      except ValueError as e:
        raise DataError(
          f'{self.path}: not a token array ({str(e).splitlines()[0][:120]})'
        ) from None
    return self._store

  def __len__(self) -> int:
    return self.store.shape[0]

  @property
  def dtype(self) -> np.dtype:
    return self.store.dtype.numpy_dtype

  def __getitem__(self, index):
    try:
      return self.store[index].read().result()
    except ValueError as e:  # DATA_LOSS (crc32c mismatch) or NOT_FOUND (missing chunk)
      raise _damaged(self.path, e) from None

  def read_many(self, starts, stops) -> list[np.ndarray]:
    """tokens[start:stop] for every pair; all reads are issued before any result is awaited."""
    store = self.store
    futures = [store[int(a) : int(b)].read() for a, b in zip(starts, stops)]
    try:
      return [f.result() for f in futures]
    except ValueError as e:
      raise _damaged(self.path, e) from None

  def __getstate__(self):
    return {'path': self.path}

  def __setstate__(self, state):
    self.__init__(state['path'])

  def __repr__(self) -> str:
    return f'TokenArray({self.path!r})'


def read_many(tokens, starts, stops) -> list[np.ndarray]:
  """Batched slices of a TokenArray or a numpy array."""
  if hasattr(tokens, 'read_many'):
    return tokens.read_many(starts, stops)
  return [tokens[int(a) : int(b)] for a, b in zip(starts, stops)]


@dataclasses.dataclass(frozen=True)
class Split:
  """One split of a prepared dataset: its tokens and document offsets."""

  tokens: TokenArray
  offsets: np.ndarray

  @property
  def num_documents(self) -> int:
    return len(self.offsets) - 1


def open_split(directory: str, split: str) -> Split:
  """The `split` ('train' or 'heldout') of the prepared dataset in `directory`."""
  if not storage.isfile(storage.join(directory, 'metadata.json')):
    raise DataError(f'{directory} has no metadata.json: not a (complete) prepared dataset')
  offsets = storage.load_npy(storage.join(directory, split, 'offsets.npy'))
  return Split(TokenArray(storage.join(directory, split, 'tokens')), offsets)


class WindowSource:
  """Record i is tokens[i*L : i*L + L + 1] as int32 (inputs plus 1 target); windows cross
  document boundaries. Memory-mapped numpy arrays pickle as (file, offset, shape)."""

  def __init__(self, tokens, seq_len: int):
    if seq_len <= 0:
      raise ValueError(f'seq_len={seq_len}: expected a positive value')
    self.tokens = tokens
    self.seq_len = seq_len
    self._len = max(len(tokens) - 1, 0) // seq_len

  def __len__(self) -> int:
    return self._len

  def __getitem__(self, index: int) -> np.ndarray:
    return self.read_batch([index])[0]

  def read_batch(self, indices) -> np.ndarray:
    """int32 [len(indices), L + 1]: the windows, read together."""
    indices = np.asarray(indices, dtype=np.int64).reshape(-1)
    if indices.size and (indices.min() < 0 or indices.max() >= self._len):
      raise IndexError(f'window index out of range for {self._len} windows')
    starts = indices * self.seq_len
    out = np.empty((len(indices), self.seq_len + 1), dtype=np.int32)
    for row, window in zip(out, read_many(self.tokens, starts, starts + self.seq_len + 1)):
      row[:] = window
    return out

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
      state['tokens'] = np.memmap(  # local: a numpy memmap (tests) maps this machine's disk
        filename, dtype=dtype, mode='r', offset=offset, shape=shape
      )
    self.__dict__.update(state)

  def __repr__(self) -> str:
    return f'WindowSource(windows={self._len}, seq_len={self.seq_len})'


class PackedSource:
  """Rows of L (input, target) pairs packed from whole documents, with segment ids and positions.

  Each document of n tokens (EOS included) gives n-1 pairs. In epoch e the documents are taken in
  a seeded permutation, their pairs concatenated and cut into rows of L; rows are then visited in
  a second seeded permutation (so one long document does not fill a batch). A document cut by a
  row boundary continues in another row as a new segment. Within a row, segment ids count from
  1 and positions restart at 0 at every segment; the epoch's last row is padded with segment 0,
  token 0 and weight 0. Record g is row g % R of epoch g // R, so any index is random-access.
  """

  def __init__(self, tokens, offsets: np.ndarray, seq_len: int, seed: int):
    if seq_len <= 0:
      raise ValueError(f'seq_len={seq_len}: expected a positive value')
    offsets = np.asarray(offsets, dtype=np.int64)
    pairs = np.diff(offsets) - 1
    keep = pairs > 0  # a document of only EOS has nothing to predict
    self.tokens, self.seq_len, self.seed = tokens, seq_len, seed
    self.starts, self.pairs = offsets[:-1][keep], pairs[keep]
    self.total_pairs = int(self.pairs.sum())
    self.rows_per_epoch = -(-self.total_pairs // seq_len)
    self._epochs = {}

  def __len__(self) -> int:
    return self.rows_per_epoch

  def _epoch(self, epoch: int):
    if epoch not in self._epochs:
      if len(self._epochs) >= 2:
        self._epochs.pop(min(self._epochs))
      doc_perm = np.random.default_rng([self.seed, epoch, 0]).permutation(len(self.pairs))
      cum = np.concatenate([[0], np.cumsum(self.pairs[doc_perm])])
      row_perm = np.random.default_rng([self.seed, epoch, 1]).permutation(self.rows_per_epoch)
      self._epochs[epoch] = (doc_perm, cum, row_perm)
    return self._epochs[epoch]

  def _pieces(self, index: int):
    """[(row offset, token start, pair count)] of global row `index`."""
    doc_perm, cum, row_perm = self._epoch(index // self.rows_per_epoch)
    lo = int(row_perm[index % self.rows_per_epoch]) * self.seq_len
    hi = lo + self.seq_len
    j = int(np.searchsorted(cum, lo, side='right')) - 1
    pieces = []
    while j < len(doc_perm) and cum[j] < hi:
      a, b = max(lo, cum[j]), min(hi, cum[j + 1])
      pieces.append((int(a - lo), int(self.starts[doc_perm[j]] + a - cum[j]), int(b - a)))
      j += 1
    return pieces

  def read_batch(self, indices) -> dict:
    """{'inputs', 'targets', 'segment_ids', 'positions'}: int32 [B, L]; 'weights': f32 [B, L]."""
    indices = np.asarray(indices, dtype=np.int64).reshape(-1)
    shape = (len(indices), self.seq_len)
    out = {k: np.zeros(shape, np.int32) for k in ('inputs', 'targets', 'segment_ids', 'positions')}
    out['weights'] = np.zeros(shape, np.float32)
    plan = [(row, *p) for row, i in enumerate(indices) for p in self._pieces(int(i))]
    reads = read_many(self.tokens, [p[2] for p in plan], [p[2] + p[3] + 1 for p in plan])
    segment = {}
    for (row, at, _, n), toks in zip(plan, reads):
      segment[row] = segment.get(row, 0) + 1
      span = slice(at, at + n)
      out['inputs'][row, span] = toks[:-1]
      out['targets'][row, span] = toks[1:]
      out['segment_ids'][row, span] = segment[row]
      out['positions'][row, span] = np.arange(n, dtype=np.int32)
      out['weights'][row, span] = 1.0
    return out

  def __getstate__(self):
    return {**self.__dict__, '_epochs': {}}  # workers rebuild the per-epoch plans they need

  def __repr__(self) -> str:
    return f'PackedSource(documents={len(self.pairs)}, rows_per_epoch={self.rows_per_epoch})'
