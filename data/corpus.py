"""Prepared datasets: the default corpus (this interpreter's stdlib `.py` files), lookup, checks.

Why the stdlib: it is on every machine, needs no download, and is ~30 MB of real text, so any
checkout can train and evaluate out of the box. It is prepared by the same code as
`python -m data.prepare` (one document per file, split by a hash of the file's relative path, so
the split is stable across machines and does not move when files are added) into a cache
directory (`data.cache_dir`, local or gs://) keyed by Python version, tokenizer fingerprint and
file listing. Preparation happens in a temporary directory moved into place (locally one rename; on
object storage file by file, metadata.json last), so concurrent preparers never leave a
half-written dataset behind; a directory without metadata.json is never used.
"""

import contextlib
import hashlib
import json
import os
import sys
import sysconfig

import numpy as np

from data import prepare, sources, storage, verify
from data.errors import DataError
from data.tokenizer import get_tokenizer

SPLITS = prepare.SPLITS
is_heldout = prepare.is_heldout
_SKIP_DIRS = ('site-packages', 'dist-packages', '__pycache__')


def stdlib_files() -> tuple[str, list[str]]:
  """(stdlib dir, sorted relative paths of its `*.py` files), without site-packages or venvs."""
  root = sysconfig.get_paths()['stdlib']
  files = []
  # The interpreter's own source files: always local, never a user path.
  for dirpath, dirnames, filenames in os.walk(root):  # local: the stdlib
    venv = lambda d: os.path.exists(os.path.join(dirpath, d, 'pyvenv.cfg'))  # local: the stdlib
    dirnames[:] = [d for d in dirnames if d not in _SKIP_DIRS and not venv(d)]
    rel = os.path.relpath(dirpath, root)  # local: the stdlib
    files += [f if rel == '.' else f'{rel}/{f}' for f in filenames if f.endswith('.py')]
  return root, sorted(f.replace(os.sep, '/') for f in files)


def _cache_root(data_cfg) -> str:
  root = data_cfg.cache_dir or os.environ.get('ROUTED_CACHE')
  if not root:
    root = os.path.join(os.path.expanduser('~'), '.cache', 'routed_transformers')  # local: ~
  return storage.resolve(root)


def _is_complete(directory: str) -> bool:
  return storage.isfile(storage.join(directory, 'metadata.json'))


def prepare_default_corpus(data_cfg) -> str:
  """Prepares the stdlib corpus into the cache once and returns its directory (fast when cached)."""
  tokenizer = get_tokenizer(data_cfg.tokenizer)
  root, files = stdlib_files()
  size = lambda f: os.path.getsize(os.path.join(root, f))  # local: the stdlib's own files
  listing = ''.join(f'{f}\t{size(f)}\n' for f in files)
  list_hash = hashlib.sha256(listing.encode()).hexdigest()
  version = '.'.join(map(str, sys.version_info[:3]))
  name = (
    f'stdlib-py{version}-heldout{data_cfg.heldout_fraction!r}-{tokenizer.fingerprint}-'
    f'{list_hash[:12]}-v3'
  )
  final = storage.join(_cache_root(data_cfg), name)
  if _is_complete(final):
    return final
  tmp = storage.sibling(final, 'tmp')
  try:
    meta = prepare.prepare_dataset(
      os.path.join(root, '**/*.py'),  # local: the stdlib (recorded as the input, never globbed)
      tmp,
      fmt='text',
      tokenizer=tokenizer.spec,
      files=(root, files),
      heldout_fraction=data_cfg.heldout_fraction,
      source='python-stdlib',
    )
    if not meta['documents']['heldout']:
      raise DataError(
        f'data.heldout_fraction={data_cfg.heldout_fraction} leaves an empty split '
        f'of the {len(files)} stdlib files in {root}'
      )
    _move_into_place(tmp, final)
  finally:
    with contextlib.suppress(OSError):  # a no-op once moved; removes ours if we lost a race
      storage.rmtree(tmp)
  return final


def _move_into_place(tmp: str, final: str) -> None:
  """Moves `tmp` to `final`; a complete `final` that appeared meanwhile wins. On object storage,
  which cannot rename a directory, `storage.move_into` moves it piece by piece with metadata.json
  last: a reader never sees it before the rest, and two preparers racing write the same bytes
  (preparing is deterministic)."""
  if storage.is_remote(final):
    if not _is_complete(final):
      storage.move_into(tmp, final, last='metadata.json')
    return
  if storage.isdir(final) and not _is_complete(final):
    stale = storage.sibling(final, 'stale')
    try:
      if not _is_complete(final):
        storage.move(final, stale)  # incomplete leftovers: set aside
    except FileNotFoundError:
      pass  # another preparer moved it first
    with contextlib.suppress(OSError):
      storage.rmtree(stale)
  try:
    storage.move(tmp, final)
  except OSError:
    if not _is_complete(final):
      raise


def load_split(directory: str, split: str) -> np.ndarray:
  """One split of a prepared dataset as a flat in-memory token array (for held-out evaluation;
  training reads through `sources.open_split`)."""
  if split not in SPLITS:
    raise ValueError(f'split={split!r}: expected one of {SPLITS}')
  return sources.open_split(directory, split).tokens[:]


def load_metadata(directory: str) -> dict:
  return json.loads(_metadata_text(directory))


def _metadata_text(directory: str) -> str:
  path = storage.join(directory, 'metadata.json')
  if not storage.isfile(path):
    raise DataError(f'{directory} has no metadata.json: not a (complete) prepared dataset')
  return storage.read_text(path)


def resolve_dataset(data_cfg) -> str:
  """The dataset directory to train on: `data.path` if set, else the default corpus; its files
  checked per `data.verify` (once per process and mode; `data.verify` explains the checks)."""
  if not data_cfg.path:
    directory = prepare_default_corpus(data_cfg)
  else:
    directory = data_cfg.path
    needed = (
      ['metadata.json'] + [f'{s}/offsets.npy' for s in SPLITS] + [f'{s}/tokens' for s in SPLITS]
    )
    missing = [n for n in needed if not storage.exists(storage.join(directory, n))]
    if missing:
      raise DataError(
        f'data.path={directory!r} is not a prepared dataset: missing '
        f'{", ".join(missing)} (run python -m data.prepare --output=...)'
      )
  text = _metadata_text(directory)
  key = (storage.resolve(directory), data_cfg.verify, hashlib.sha256(text.encode()).hexdigest())
  if key not in _VERIFIED:
    _VERIFIED[key] = verify.check(directory, json.loads(text), data_cfg.verify)
  return directory


# (directory, data.verify, sha256 of metadata.json) -> the mode the check ran in: a dataset
# prepared again in the same place (a new metadata.json) is checked again
_VERIFIED = {}


def dataset_tokenizer(directory: str):
  """The tokenizer a dataset was prepared with (its file must still match the fingerprint)."""
  info = load_metadata(directory)['tokenizer']
  tok = get_tokenizer(info['spec'])
  if tok.fingerprint != info['fingerprint']:
    raise DataError(
      f'tokenizer {info["spec"]!r} changed since {directory} was prepared '
      f'(fingerprint {tok.fingerprint} != {info["fingerprint"]})'
    )
  return tok


def check_vocab(directory: str, model_vocab_size: int) -> None:
  """Refuses a dataset whose token ids do not all fit the model's embedding."""
  meta = load_metadata(directory)
  if meta['vocab_size'] > model_vocab_size:
    raise DataError(
      f'model.vocab_size={model_vocab_size} is smaller than the vocabulary '
      f'{meta["vocab_size"]} of {directory} (tokenizer {meta["tokenizer"]["spec"]}); '
      f'set --config.model.vocab_size >= {meta["vocab_size"]}'
    )
