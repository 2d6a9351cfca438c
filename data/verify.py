"""Checksums of a prepared dataset's files, recorded by `data.prepare` and checked before training.

Two layers guard the token store against damage (a deleted shard file, bytes altered on disk):
- every read: each 4 Ki-token inner chunk carries a crc32c (zarr3 codec) that TensorStore checks
  when it decodes the chunk, and a missing chunk is an error instead of zeros
  (`fill_missing_data_reads=False`, see `data.sources`);
- before training (`data.verify`): every file the dataset consists of must exist with its recorded
  size ('sizes'), and with 'full' also its recorded sha256. 'auto' is 'full' up to
  AUTO_FULL_LIMIT_BYTES of files (sha256 runs at about 1.7 GB/s on one core of the 2-core CI
  machine, so the limit costs about 1.3 s) and 'sizes' above it.

A damaged file stops the run in one line that names it, before anything is compiled. A dataset on
gs:// is checked the same way through `data.storage` ('sizes' reads object metadata only, 'full'
downloads every file once).
"""

import hashlib

from data import storage
from data.errors import DataError

AUTO_FULL_LIMIT_BYTES = 2 << 30
_BLOCK_BYTES = 8 << 20


def _sha256(path: str) -> str:
  digest = hashlib.sha256()
  with storage.open_file(path, 'rb') as fh:
    while block := fh.read(_BLOCK_BYTES):
      digest.update(block)
  return digest.hexdigest()


def dataset_files(directory: str, splits) -> list[str]:
  """Relative ('/'-separated) paths of the files that make up the splits of a prepared dataset,
  sorted; `directory` is local or a gs:// / s3:// URL."""
  return sorted(
    f'{split}/{f}' for split in splits for f in storage.walk_files(storage.join(directory, split))
  )


def record(directory: str, splits) -> dict:
  """{relative path: {'bytes': size, 'sha256': hex}} for every file of the splits."""
  return {
    rel: {
      'bytes': storage.getsize(storage.join(directory, rel)),
      'sha256': _sha256(storage.join(directory, rel)),
    }
    for rel in dataset_files(directory, splits)
  }


def resolve_mode(mode: str, files: dict) -> str:
  """'auto' becomes 'full' or 'sizes' by the recorded total size; other modes stay."""
  if mode != 'auto':
    return mode
  total = sum(f['bytes'] for f in files.values())
  return 'full' if total <= AUTO_FULL_LIMIT_BYTES else 'sizes'


def check(directory: str, meta: dict, mode: str) -> str:
  """Checks the files of a prepared dataset against metadata.json's record; returns the mode
  used ('off' also when the dataset predates checksums). Damage raises a one-line DataError."""
  files = meta.get('checksums')
  if mode == 'off' or files is None:
    return 'off'
  mode = resolve_mode(mode, files)
  redo = f're-run python -m data.prepare for {directory}, or restore it'
  for rel, want in files.items():
    path = storage.join(directory, rel)
    try:
      size = storage.getsize(path)
    except FileNotFoundError:
      raise DataError(f'{path} is missing: the prepared dataset is damaged; {redo}') from None
    if size != want['bytes']:
      raise DataError(
        f'{path} has {size} bytes, {want["bytes"]} were prepared: the prepared '
        f'dataset is damaged; {redo}'
      )
    if mode == 'full' and _sha256(path) != want['sha256']:
      raise DataError(
        f'{path} does not match its recorded sha256: the prepared dataset is damaged; {redo}'
      )
  return mode
