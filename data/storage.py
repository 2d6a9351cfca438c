"""Where a run's files live: one layer for every user path (workdir, data dir, sweep root, eval
output, export folder), local or on object storage (docs/storage.md).

A location is a string: a local path (made absolute here), `gs://BUCKET/PATH` or `s3://BUCKET/PATH`
(`file://PATH` reads as the local PATH). File operations go through `etils.epath` (gcsfs for
`gs://`); TensorStore gets a kvstore spec derived from the same string. The guarantees callers rely
on hold on both kinds of storage:

- `write_bytes` / `write_text` are atomic: a reader sees the old content or the new, never a part
  (locally a temporary file renamed over the target; an object upload is atomic by itself).
- `create_exclusive` creates a file only if it does not exist (locally O_EXCL; on `gs://` an upload
  with the precondition "no live generation"), which makes the workdir lock work on a bucket.
- `probe` writes and deletes one small object, so a run refuses storage it cannot write before
  step 1, in one line naming the URL.
- `move_into` publishes a directory written beside its target with one file last (the one readers
  wait for), where a bucket cannot rename a directory.

The two gs:// operations epath cannot express (a create-only-if-absent upload, a probe without
retries) are in data/gcs.py.

No other module calls `os.path` or `open()` on a user path (tests/test_storage_static.py checks this).
"""

import contextlib
import io
import json
import os
import posixpath
import uuid

from data.errors import DataError

REMOTE_SCHEMES = ('gs', 's3')
# gcsfs asks a bucket's layout from the Storage Control API, which a local emulator lacks (a
# warning per call); plain buckets need none of it.
if os.environ.get('STORAGE_EMULATOR_HOST'):
  os.environ.setdefault('GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT', 'false')
  os.environ.setdefault('TENSORSTORE_GCS_HTTP_URL', os.environ['STORAGE_EMULATOR_HOST'])


class StorageError(DataError):
  """A location that cannot be used (scheme, endpoint, credentials, bucket); one line, naming it."""


def scheme(location: str) -> str:
  """'gs', 's3' or '' (local)."""
  head, sep, _ = str(location).partition('://')
  return head.lower() if sep and head.lower() != 'file' else ''


def resolve(location: str) -> str:
  """The canonical form of `location`: an absolute local path, or `SCHEME://BUCKET/PATH` without a
  trailing slash. Refuses an unknown scheme or a URL without a bucket."""
  location = os.fspath(location)
  head, sep, rest = location.partition('://')
  if not sep:
    return os.path.abspath(os.path.expanduser(location))
  kind = head.lower()
  if kind == 'file':
    return os.path.abspath(rest)
  if kind not in REMOTE_SCHEMES:
    raise StorageError(
      f"{location}: unknown URL scheme '{head}://'; expected a local path, gs://BUCKET/PATH or "
      's3://BUCKET/PATH'
    )
  bucket = rest.split('/', 1)[0]
  if not bucket:
    raise StorageError(f'{location}: no bucket name; expected {kind}://BUCKET/PATH')
  return f'{kind}://{rest.strip("/")}'


def is_remote(location: str) -> bool:
  return bool(scheme(location))


def join(base: str, *parts: str) -> str:
  if is_remote(base):
    return posixpath.join(str(base).rstrip('/'), *parts)
  return os.path.join(base, *parts)


def parent(location: str) -> str:
  if is_remote(location):
    return posixpath.dirname(str(location).rstrip('/'))
  return os.path.dirname(location)


def basename(location: str) -> str:
  return posixpath.basename(str(location).rstrip('/'))


def bucket_and_key(location: str) -> tuple[str, str]:
  """('runs', 'tiny/metrics.jsonl') for gs://runs/tiny/metrics.jsonl."""
  rest = resolve(location).partition('://')[2]
  bucket, _, key = rest.partition('/')
  return bucket, key


def path(location: str):
  """An `epath.Path` for `location` (gs:// needs gcsfs, s3:// needs s3fs)."""
  from etils import epath  # pylint: disable=g-import-not-at-top

  location = resolve(location)
  if scheme(location) == 'gs':
    _configure_gcsfs()
  elif scheme(location) == 's3':
    try:
      import s3fs  # noqa: F401  pylint: disable=g-import-not-at-top,unused-import
    except ImportError:
      raise StorageError(
        f'{location}: s3:// files need the s3fs package (pip install s3fs)'
      ) from None
  return epath.Path(location)


def _configure_gcsfs() -> None:
  """gcsfs caches directory listings; other processes (and TensorStore, and Orbax) write the same
  bucket, so a cached listing would hide their files: every listing is asked afresh."""
  import fsspec  # pylint: disable=g-import-not-at-top

  fsspec.config.conf.setdefault('gs', {})['use_listings_cache'] = False


def _filesystem(location: str):
  """The fsspec filesystem behind a remote `location` (the one epath uses)."""
  import fsspec  # pylint: disable=g-import-not-at-top

  path(location)  # configures it, and checks that the package is there
  return fsspec.filesystem(scheme(location))


def kvstore(location: str) -> dict:
  """The TensorStore kvstore spec of `location`: `file`, `gcs` or `s3`."""
  location = resolve(location)
  kind = scheme(location)
  if not kind:
    return {'driver': 'file', 'path': location}
  bucket, key = bucket_and_key(location)
  return {'driver': 'gcs' if kind == 'gs' else 's3', 'bucket': bucket, 'path': key}


# -- files ------------------------------------------------------------------------------------


def exists(location: str) -> bool:
  return path(location).exists()


def isfile(location: str) -> bool:
  p = path(location)
  return p.exists() and not p.is_dir()


def isdir(location: str) -> bool:
  return path(location).is_dir()


def listdir(location: str) -> list[str]:
  """Names in a directory (an empty list when it does not exist)."""
  p = path(location)
  return sorted(c.name for c in p.iterdir()) if p.is_dir() else []


def walk_files(location: str) -> list[str]:
  """Every file under `location`, as '/'-separated paths relative to it, sorted."""
  location = resolve(location)
  if is_remote(location):
    root = location.partition('://')[2]
    return sorted(f[len(root) :].lstrip('/') for f in _filesystem(location).find(root))
  found = []
  for dirpath, _, filenames in os.walk(location):
    rel = os.path.relpath(dirpath, location)
    found += [name if rel == '.' else f'{rel}/{name}'.replace(os.sep, '/') for name in filenames]
  return sorted(found)


def getsize(location: str) -> int:
  return path(location).stat().length


def makedirs(location: str) -> None:
  """A directory and its parents (object stores have no directories: nothing to do there)."""
  if not is_remote(location):
    os.makedirs(resolve(location), exist_ok=True)


def open_file(location: str, mode: str = 'r'):
  """A file object; a remote file opened for writing appears whole when it is closed."""
  return path(location).open(mode)


def read_bytes(location: str) -> bytes:
  return path(location).read_bytes()


def read_text(location: str) -> str:
  return path(location).read_text()


def read_json(location: str):
  return json.loads(read_text(location))


def write_bytes(location: str, data: bytes) -> None:
  """Writes `data` atomically (see the module docstring); creates the parent directory."""
  if is_remote(location):
    path(location).write_bytes(data)
    return
  target = resolve(location)
  os.makedirs(os.path.dirname(target), exist_ok=True)
  tmp = f'{target}.tmp-{uuid.uuid4().hex[:8]}'
  try:
    with open(tmp, 'wb') as f:
      f.write(data)
    os.replace(tmp, target)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)


def write_text(location: str, text: str) -> None:
  write_bytes(location, text.encode('utf-8'))


def write_json(location: str, obj, **kwargs) -> None:
  write_text(location, json.dumps(obj, **kwargs))


def _write_rendered(location: str, render) -> None:
  """`render(buffer)` writes into memory; the bytes are then written as `write_bytes` does."""
  buffer = io.BytesIO()
  render(buffer)
  write_bytes(location, buffer.getvalue())


def save_npy(location: str, array) -> None:
  import numpy as np  # pylint: disable=g-import-not-at-top

  _write_rendered(location, lambda buffer: np.save(buffer, array))


def load_npy(location: str):
  import numpy as np  # pylint: disable=g-import-not-at-top

  return np.load(io.BytesIO(read_bytes(location)))


def save_npz(location: str, **arrays) -> None:
  """An uncompressed .npz of `arrays`, written atomically (as `write_bytes`)."""
  import numpy as np  # pylint: disable=g-import-not-at-top

  _write_rendered(location, lambda buffer: np.savez(buffer, **arrays))


@contextlib.contextmanager
def open_npz(location: str):
  """The arrays of an .npz file by name, each read when indexed (on object storage a ranged read
  of that member only, not the whole file)."""
  import numpy as np  # pylint: disable=g-import-not-at-top

  with open_file(location, 'rb') as fh, np.load(fh) as arrays:
    yield arrays


def remove(location: str, missing_ok: bool = True) -> None:
  path(location).unlink(missing_ok=missing_ok)


def rmtree(location: str) -> None:
  p = path(location)
  if p.exists():
    p.rmtree()


def move(source: str, target: str) -> None:
  """Renames a file or directory (on object storage: copy, then delete)."""
  if is_remote(source) or is_remote(target):
    if scheme(source) != scheme(target):
      raise StorageError(f'cannot move {source} to {target}: both must be on the same storage')
    fs = _filesystem(source)
    fs.copy(resolve(source), resolve(target), recursive=isdir(source))
    fs.rm(resolve(source), recursive=True)
  else:
    os.replace(resolve(source), resolve(target))


def sibling(location: str, tag: str) -> str:
  """A fresh, unused location beside `location` (where to write before moving in)."""
  return join(parent(resolve(location)), f'.{tag}-{uuid.uuid4().hex[:12]}')


def move_into(staging: str, target: str, last: str) -> None:
  """Moves the directory `staging` to `target` so that `target/last` appears after everything
  else: locally, onto a `target` that does not exist yet, one rename; otherwise (object storage
  cannot rename a directory) entry by entry, `last` at the end, then `staging` is removed."""
  if not is_remote(target) and not exists(target):
    makedirs(parent(resolve(target)))
    move(staging, target)
    return
  for name in sorted(listdir(staging), key=lambda name: name == last):
    move(join(staging, name), join(target, name))
  rmtree(staging)


def create_exclusive(location: str, data: bytes) -> bool:
  """Creates `location` holding `data` if it does not exist; False (nothing written) if it does."""
  kind = scheme(location)
  if not kind:
    target = resolve(location)
    os.makedirs(os.path.dirname(target), exist_ok=True)
    try:
      fd = os.open(target, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
      return False
    with os.fdopen(fd, 'wb') as f:
      f.write(data)
    return True
  if kind != 'gs':
    raise StorageError(
      f'{location}: exclusive creation (the workdir lock) needs gs:// or a local path'
    )
  from data import gcs  # pylint: disable=g-import-not-at-top

  return gcs.create_if_absent(location, data)


def probe(location: str) -> None:
  """Writes and deletes one small file under `location`; a one-line StorageError naming the URL
  when that fails (unreachable endpoint, no credentials, no such bucket, no permission)."""
  location = resolve(location)
  name = join(location, f'.write-probe-{uuid.uuid4().hex[:12]}')
  if scheme(location) == 'gs':
    from data import gcs  # pylint: disable=g-import-not-at-top

    gcs.probe(location, name)
    return
  try:
    write_bytes(name, b'probe')
    remove(name)
  except OSError as e:
    raise StorageError(f'{location}: cannot write there ({e.strerror or e})') from None


def first_line(e: BaseException) -> str:
  """The first line of an exception's message (at most 200 characters), for one-line errors."""
  text = str(e).strip().splitlines()
  return text[0][:200] if text else type(e).__name__


class AppendLog:
  """A text file that grows by lines (metrics.jsonl). Locally an append-mode file, line-buffered;
  on object storage, which cannot append, the whole object is rewritten at every `flush` (each
  upload atomic, so a reader never sees a torn line)."""

  def __init__(self, location: str):
    self.location = resolve(location)
    self._remote = is_remote(self.location)
    if self._remote:
      self._text = read_text(self.location) if exists(self.location) else ''
      self._file = None
    else:
      os.makedirs(os.path.dirname(self.location), exist_ok=True)
      self._file = open(self.location, 'a', buffering=1)

  def write(self, text: str) -> None:
    if self._remote:
      self._text += text
    else:
      self._file.write(text)

  def flush(self) -> None:
    if self._remote:
      write_text(self.location, self._text)
    else:
      self._file.flush()

  def close(self) -> None:
    if self._remote:
      self.flush()
    else:
      self._file.close()


def write_figure(fig, location: str, **kwargs) -> str:
  """Writes a matplotlib figure to `location` (format from its extension, default PNG), rendered in
  memory and written atomically like `write_bytes`; returns `location`."""
  kind = posixpath.splitext(str(location))[1][1:] or 'png'
  _write_rendered(location, lambda buffer: fig.savefig(buffer, format=kind, **kwargs))
  return location
