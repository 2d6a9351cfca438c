"""Prepared datasets: the default corpus (this interpreter's stdlib `.py` files), lookup, checks.

Why the stdlib: it is on every machine, needs no download, and is ~30 MB of real text, so any
checkout can train and evaluate out of the box. It is prepared by the same code as
`python -m data.prepare` (one document per file, split by a hash of the file's relative path, so
the split is stable across machines and does not move when files are added) into a cache
directory keyed by Python version, tokenizer fingerprint and file listing. Preparation happens in
a temporary directory renamed into place, so concurrent preparers never leave a half-written
dataset behind; a directory without metadata.json is never used.
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

from data import prepare, sources, verify
from data.errors import DataError
from data.tokenizer import get_tokenizer

SPLITS = prepare.SPLITS
is_heldout = prepare.is_heldout
_SKIP_DIRS = ('site-packages', 'dist-packages', '__pycache__')


def stdlib_files() -> tuple[str, list[str]]:
  """(stdlib dir, sorted relative paths of its `*.py` files), without site-packages or venvs."""
  root = sysconfig.get_paths()['stdlib']
  files = []
  for dirpath, dirnames, filenames in os.walk(root):
    dirnames[:] = [
      d
      for d in dirnames
      if d not in _SKIP_DIRS and not os.path.exists(os.path.join(dirpath, d, 'pyvenv.cfg'))
    ]
    files += [
      os.path.relpath(os.path.join(dirpath, f), root) for f in filenames if f.endswith('.py')
    ]
  return root, sorted(pathlib.PurePath(f).as_posix() for f in files)


def _cache_root(data_cfg) -> str:
  root = (
    data_cfg.cache_dir
    or os.environ.get('ROUTED_CACHE')
    or os.path.join(os.path.expanduser('~'), '.cache', 'routed_transformers')
  )
  return os.path.abspath(root)


def _is_complete(directory: str) -> bool:
  return os.path.isfile(os.path.join(directory, 'metadata.json'))


def prepare_default_corpus(data_cfg) -> str:
  """Prepares the stdlib corpus into the cache once and returns its directory (fast when cached)."""
  tokenizer = get_tokenizer(data_cfg.tokenizer)
  root, files = stdlib_files()
  listing = ''.join(f'{f}\t{os.path.getsize(os.path.join(root, f))}\n' for f in files)
  list_hash = hashlib.sha256(listing.encode()).hexdigest()
  version = '.'.join(map(str, sys.version_info[:3]))
  name = (
    f'stdlib-py{version}-heldout{data_cfg.heldout_fraction!r}-{tokenizer.fingerprint}-'
    f'{list_hash[:12]}-v3'
  )
  final = os.path.join(_cache_root(data_cfg), name)
  if _is_complete(final):
    return final
  os.makedirs(os.path.dirname(final), exist_ok=True)
  tmp = tempfile.mkdtemp(prefix=f'.tmp-{name}-', dir=os.path.dirname(final))
  try:
    meta = prepare.prepare_dataset(
      os.path.join(root, '**/*.py'),
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
  """One split of a prepared dataset as a flat in-memory token array (for held-out evaluation;
  training reads through `sources.open_split`)."""
  if split not in SPLITS:
    raise ValueError(f'split={split!r}: expected one of {SPLITS}')
  return sources.open_split(directory, split).tokens[:]


def load_metadata(directory: str) -> dict:
  path = os.path.join(directory, 'metadata.json')
  if not os.path.isfile(path):
    raise DataError(f'{directory} has no metadata.json: not a (complete) prepared dataset')
  with open(path) as fh:
    return json.load(fh)


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
    missing = [n for n in needed if not os.path.exists(os.path.join(directory, n))]
    if missing:
      raise DataError(
        f'data.path={directory!r} is not a prepared dataset: missing '
        f'{", ".join(missing)} (run python -m data.prepare --output=...)'
      )
  mode = data_cfg.verify
  key = (
    os.path.abspath(directory),
    mode,
    os.stat(os.path.join(directory, 'metadata.json')).st_mtime_ns,
  )
  if key not in _VERIFIED:
    _VERIFIED[key] = verify.check(directory, load_metadata(directory), mode)
  return directory


_VERIFIED = {}  # (directory, data.verify, metadata.json mtime) -> the mode the check ran in


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
