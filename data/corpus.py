"""The default corpus (this interpreter's stdlib `.py` files) as two flat token arrays.

Why the stdlib: it is on every machine, needs no download, and is ~30 MB of real text, so any
checkout can train and evaluate out of the box. A prepared dataset directory holds

  train.npy, heldout.npy   flat uint16 token arrays; each document is followed by EOS
  metadata.json            written last: a directory without it is never used

Held-out files are chosen by a hash of their relative path, so the split is stable across
machines and does not move when files are added. Preparation is atomic (temp dir in the same
parent, then rename), so concurrent preparers never leave a half-written dataset behind.
This module is deliberately small: the TensorStore data layer will replace it.
"""

import hashlib
import json
import os
import pathlib
import shutil
import sys
import sysconfig
import tempfile

import numpy as np

from data.tokenizer import get_tokenizer

SPLITS = ('train', 'heldout')


class DataError(ValueError):
  """A dataset that is missing, incomplete or too small; the message is one line for the CLI."""

_SKIP_DIRS = ('site-packages', 'dist-packages', '__pycache__')


def stdlib_files() -> tuple[str, list[str]]:
  """(stdlib dir, sorted relative paths of its `*.py` files), without site-packages or venvs."""
  root = sysconfig.get_paths()['stdlib']
  files = []
  for dirpath, dirnames, filenames in os.walk(root):
    dirnames[:] = [d for d in dirnames if d not in _SKIP_DIRS and
                   not os.path.exists(os.path.join(dirpath, d, 'pyvenv.cfg'))]
    files += [os.path.relpath(os.path.join(dirpath, f), root) for f in filenames if f.endswith('.py')]
  return root, sorted(pathlib.PurePath(f).as_posix() for f in files)


def is_heldout(rel_path: str, fraction: float) -> bool:
  """A file is held out when the first 32 bits of sha256(path), as a fraction, fall below it."""
  return int(hashlib.sha256(rel_path.encode()).hexdigest()[:8], 16) / 2**32 < fraction


def _cache_root(data_cfg) -> str:
  root = (data_cfg.cache_dir or os.environ.get('ROUTED_CACHE') or
          os.path.join(os.path.expanduser('~'), '.cache', 'routed_transformers'))
  return os.path.abspath(root)


def _is_complete(directory: str) -> bool:
  return os.path.isfile(os.path.join(directory, 'metadata.json'))


def prepare_default_corpus(data_cfg) -> str:
  """Tokenizes the stdlib corpus into the cache once and returns its directory (fast when cached)."""
  tokenizer = get_tokenizer(data_cfg.tokenizer)
  root, files = stdlib_files()
  listing = ''.join(f'{f}\t{os.path.getsize(os.path.join(root, f))}\n' for f in files)
  list_hash = hashlib.sha256(listing.encode()).hexdigest()
  version = '.'.join(map(str, sys.version_info[:3]))
  name = f'stdlib-py{version}-heldout{data_cfg.heldout_fraction!r}-{tokenizer.fingerprint}-{list_hash[:12]}'
  final = os.path.join(_cache_root(data_cfg), name)
  if _is_complete(final):
    return final
  os.makedirs(os.path.dirname(final), exist_ok=True)
  tmp = tempfile.mkdtemp(prefix=f'.tmp-{name}-', dir=os.path.dirname(final))
  try:
    docs = {split: [] for split in SPLITS}
    non_utf8 = {split: 0 for split in SPLITS}
    for f in files:
      split = 'heldout' if is_heldout(f, data_cfg.heldout_fraction) else 'train'
      data = pathlib.Path(root, f).read_bytes()
      try:
        data.decode('utf-8')
      except UnicodeDecodeError:
        non_utf8[split] += 1  # still fine as bytes; counted so nothing is hidden
      docs[split].append(tokenizer.encode(data, add_eos=True))
    if not docs['heldout'] or not docs['train']:
      raise DataError(f'data.heldout_fraction={data_cfg.heldout_fraction} leaves an empty split '
                       f'of the {len(files)} stdlib files in {root}')
    tokens = {}
    for split in SPLITS:
      array = np.concatenate(docs[split])
      np.save(os.path.join(tmp, f'{split}.npy'), array)
      tokens[split] = int(array.size)
    metadata = {
        'source': 'python-stdlib', 'source_dir': root, 'python_version': version,
        'tokenizer': tokenizer.fingerprint, 'vocab_size': tokenizer.vocab_size,
        'heldout_fraction': data_cfg.heldout_fraction, 'file_list_sha256': list_hash,
        'files': {s: len(docs[s]) for s in SPLITS}, 'non_utf8_files': non_utf8,
        'tokens': tokens, 'dtype': np.dtype(tokenizer.dtype).name,
    }
    with open(os.path.join(tmp, 'metadata.json'), 'w') as fh:
      json.dump(metadata, fh, indent=2)
    os.chmod(tmp, 0o755)  # mkdtemp makes it 0o700
    _move_into_place(tmp, final)
  finally:
    shutil.rmtree(tmp, ignore_errors=True)  # a no-op once renamed; removes ours if we lost a race
  return final


def _move_into_place(tmp: str, final: str) -> None:
  """Renames `tmp` to `final`; a complete `final` that appeared meanwhile wins."""
  if os.path.isdir(final) and not _is_complete(final):
    stale = tempfile.mkdtemp(prefix='.stale-', dir=os.path.dirname(final))
    try:
      if not _is_complete(final):
        os.rename(final, os.path.join(stale, 'old'))  # incomplete leftovers: set aside
    except FileNotFoundError:
      pass  # another preparer moved it first
    shutil.rmtree(stale, ignore_errors=True)
  try:
    os.rename(tmp, final)
  except OSError:
    if not _is_complete(final):
      raise


def load_split(directory: str, split: str) -> np.ndarray:
  """One split of a prepared dataset as a read-only memory-mapped flat token array."""
  if split not in SPLITS:
    raise ValueError(f'split={split!r}: expected one of {SPLITS}')
  path = os.path.join(directory, f'{split}.npy')
  if not os.path.isfile(path):
    raise DataError(f'{path} does not exist: not a prepared dataset')
  return np.load(path, mmap_mode='r')


def load_metadata(directory: str) -> dict:
  with open(os.path.join(directory, 'metadata.json')) as fh:
    return json.load(fh)


def resolve_dataset(data_cfg) -> str:
  """The dataset directory to train on: `data.path` if set (checked), else the default corpus."""
  if not data_cfg.path:
    return prepare_default_corpus(data_cfg)
  needed = ['metadata.json'] + [f'{s}.npy' for s in SPLITS]
  missing = [n for n in needed if not os.path.isfile(os.path.join(data_cfg.path, n))]
  if missing:
    raise DataError(f'data.path={data_cfg.path!r} is not a prepared dataset: missing '
                            f'{", ".join(missing)} (expected {", ".join(needed)})')
  return data_cfg.path
