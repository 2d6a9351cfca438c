"""Tokenizing input files into piece files for `data.prepare`: groups of about GROUP_BYTES of input,
each tokenized (in worker processes when asked) into one .npz piece written atomically, with the
documents split between train and held-out by a hash of their key. Input files are local
(`data.inputs`); the pieces go through `data.storage`, next to the dataset (local or gs://)."""

import hashlib
import json
import multiprocessing
import os
import sys
import time

import numpy as np

from data import storage
from data.inputs import REPAIRS, SKIPS, read_records, unreadable_reason
from data.tokenizer import get_tokenizer

SPLITS = ('train', 'heldout')
_ENCODE_BATCH = 256  # documents per tokenizer call


def is_heldout(key: str, fraction: float) -> bool:
  """A document is held out when the first 32 bits of sha256(key), as a fraction, fall below it.
  Keys are relative paths (never absolute), so the split does not depend on where the input lies.
  If this picks no document among >= 2 (fraction > 0), prepare moves the training document with the
  smallest sha256(key) to held-out (`_forced_heldout`), so held-out is never empty."""
  return int(hashlib.sha256(key.encode()).hexdigest()[:8], 16) / 2**32 < fraction


_TOKENIZERS = {}
GROUP_BYTES = 4 << 20  # input bytes per piece file (the unit of parallel work and of resume)
GROUP_FILES = 256  # at most this many input files per piece file


def _tokenizer(spec: str):
  """One tokenizer per spec per process (workers load the file once)."""
  if spec not in _TOKENIZERS:
    _TOKENIZERS[spec] = get_tokenizer(spec)
  return _TOKENIZERS[spec]


def _new_counts(file_bytes=0) -> dict:
  return {
    'skipped': dict.fromkeys(SKIPS, 0),
    'repaired': dict.fromkeys(REPAIRS, 0),
    'text_bytes': dict.fromkeys(SPLITS, 0),
    'file_bytes': file_bytes,
    'unreadable': {},
    'min_train': None,
  }


def tokenize_file(task: dict, path: str, rel: str) -> tuple[dict, dict]:
  """Tokenizes one input file: ({split: [id arrays]}, counts). A file that cannot be read gives no
  documents and counts['unreadable'] = {rel: reason}; counts['min_train'] = [sha256 hex, index in
  the train list, text bytes] of the training document with the smallest key hash (or None)."""
  try:
    return _tokenize_file(task, path, rel)
  except OSError as e:
    counts = _new_counts()
    counts['unreadable'] = {rel: unreadable_reason(e)}
    return {s: [] for s in SPLITS}, counts


def _tokenize_file(task: dict, path: str, rel: str) -> tuple[dict, dict]:
  tok = _tokenizer(task['tokenizer'])
  ids = {s: [] for s in SPLITS}
  pending = {s: [] for s in SPLITS}
  counts = _new_counts(os.path.getsize(path))  # local: input files (data.inputs)
  n_train = 0

  def flush(split):
    ids[split] += tok.encode_batch(pending[split])
    pending[split].clear()

  for i, (text, reason) in enumerate(read_records(path, task['format'], task['field'])):
    if text is None:
      counts['skipped'][reason] += 1
      continue
    if reason:
      counts['repaired'][reason] += 1
    key = rel if task['format'] == 'text' else f'{rel}#{i}'
    split = 'heldout' if is_heldout(key, task['heldout_fraction']) else 'train'
    pending[split].append(text)
    n_bytes = len(text.encode('utf-8'))
    counts['text_bytes'][split] += n_bytes
    if split == 'train':
      digest = hashlib.sha256(key.encode()).hexdigest()
      if counts['min_train'] is None or digest < counts['min_train'][0]:
        counts['min_train'] = [digest, n_train, n_bytes]
      n_train += 1
    if len(pending[split]) >= _ENCODE_BATCH:
      flush(split)
  for s in SPLITS:
    flush(s)
  return ids, counts


def tokenize_group(task: dict) -> dict:
  """Tokenizes a group of input files into one atomically written piece file; returns its counts."""
  dtype = _tokenizer(task['tokenizer']).dtype
  ids = {s: [] for s in SPLITS}
  counts = _new_counts()
  for path, rel in task['files']:
    file_ids, c = tokenize_file(task, path, rel)
    if c['min_train'] is not None and (
      counts['min_train'] is None or c['min_train'][0] < counts['min_train'][0]
    ):
      counts['min_train'] = [
        c['min_train'][0],
        c['min_train'][1] + len(ids['train']),
        c['min_train'][2],
      ]
    for s in SPLITS:
      ids[s] += file_ids[s]
      counts['text_bytes'][s] += c['text_bytes'][s]
    for r in SKIPS:
      counts['skipped'][r] += c['skipped'][r]
    for r in REPAIRS:
      counts['repaired'][r] += c['repaired'][r]
    counts['unreadable'].update(c['unreadable'])
    counts['file_bytes'] += c['file_bytes']
  arrays = {}
  for s in SPLITS:
    arrays[f'{s}_lengths'] = np.array([len(x) for x in ids[s]], dtype=np.int64)
    arrays[f'{s}_tokens'] = (np.concatenate(ids[s]) if ids[s] else np.zeros(0)).astype(dtype)
  arrays['counts'] = np.frombuffer(json.dumps(counts).encode(), dtype=np.uint8)
  storage.save_npz(task['piece'], **arrays)  # atomic: a piece is whole or absent
  return counts


def piece_groups(root: str, rel: list[str], sizes: list[int]) -> list[list[tuple[str, str]]]:
  """Consecutive files in groups of about GROUP_BYTES (at most GROUP_FILES files)."""
  groups, current, size = [], [], 0
  for f, n in zip(rel, sizes):
    if current and (size + n > GROUP_BYTES or len(current) >= GROUP_FILES):
      groups.append(current)
      current, size = [], 0
    current.append((os.path.join(root, f), f))  # local: input files (data.inputs)
    size += n
  return groups + [current]


def piece_counts(piece: str) -> dict:
  with storage.open_npz(piece) as z:
    return json.loads(z['counts'].tobytes())


def run_tasks(todo, counts, processes, progress, resumed):
  """Tokenizes `todo` (in worker processes when processes > 1), printing one progress line."""
  t0, done_bytes = time.time(), 0
  if processes > 1 and len(todo) > 1:
    pool = multiprocessing.get_context('spawn').Pool(min(processes, len(todo)))
    results = pool.imap_unordered(
      _tokenize_task, todo, chunksize=max(1, len(todo) // (64 * processes))
    )
  else:
    pool, results = None, map(_tokenize_task, todo)
  try:
    for n, (piece, c) in enumerate(results, 1):
      counts[piece] = c
      done_bytes += c['file_bytes']
      if progress:
        rate = done_bytes / 1e6 / max(time.time() - t0, 1e-9)
        print(
          f'\rprepare: {n + resumed}/{len(todo) + resumed} pieces, {done_bytes / 1e6:.1f} MB, '
          f'{rate:.1f} MB/s',
          end='',
          file=sys.stderr,
          flush=True,
        )
    if progress:
      print(file=sys.stderr)
  finally:
    if pool is not None:
      pool.close()
      pool.join()


def _tokenize_task(task):
  return task['piece'], tokenize_group(task)
