"""Reading a corpus's input files for `data.prepare`: which files, which format, and each file's
documents, with bad records skipped (or repaired) and counted by reason rather than raised.

Input files are local: a glob needs a file system to expand it and the tokenizer workers read each
file whole, so `--input=gs://...` is refused in one line (copy the corpus to this machine first).
Only the prepared dataset (`--output`) may live on gs://.
"""

import glob
import json
import os
import posixpath

from data import storage
from data.errors import DataError

FORMATS = ('text', 'jsonl', 'parquet', 'arrayrecord')
SKIPS = ('non_utf8', 'bad_json', 'missing_field', 'empty')
REPAIRS = ('lone_surrogate',)  # records kept with U+FFFD in place of what could not be encoded
_EXTENSIONS = {
  '.jsonl': 'jsonl',
  '.json': 'jsonl',
  '.parquet': 'parquet',
  '.arrayrecord': 'arrayrecord',
  '.array_record': 'arrayrecord',
}


def list_inputs(pattern: str) -> tuple[str, list[str]]:
  """(common root, sorted relative paths) of the files matching a glob or naming one file."""
  if storage.scheme(pattern):
    raise DataError(
      f'--input={pattern!r}: inputs must be local files (a glob or a file on this machine); '
      'copy them here first (only --output may be gs://BUCKET/PATH)'
    )
  pattern = os.path.expanduser(pattern.removeprefix('file://'))  # local: see the module docstring
  matches = glob.glob(pattern, recursive=True)  # local: input files (see the module docstring)
  # Directories are left out; other unreadable files are skipped (and counted) later.
  files = sorted(f for f in matches if not os.path.isdir(f))  # local: input files
  if not files:
    raise DataError(
      f'--input={pattern!r} matches no files'
      + (' (only directories; use a glob such as DIR/**/*.txt)' if matches else '')
    )
  files = [os.path.abspath(f) for f in files]  # local: input files
  one = len(files) == 1
  root = os.path.dirname(files[0]) if one else os.path.commonpath(files)  # local: input files
  return root, [os.path.relpath(f, root) for f in files]  # local: input files


def input_stat(path: str) -> tuple[int, int]:
  """(size, mtime_ns) of an input file; (0, 0) for one that cannot be stat'ed (its reading fails
  and is counted)."""
  try:
    st = os.stat(path)  # local: input files
    return st.st_size, st.st_mtime_ns
  except OSError:
    return 0, 0


def infer_format(rel_paths: list[str]) -> str:
  """The format named by the files' extension (all must agree), else text."""
  kinds = {_EXTENSIONS.get(posixpath.splitext(f)[1].lower(), 'text') for f in rel_paths}
  return kinds.pop() if len(kinds) == 1 else 'text'


def read_records(path: str, fmt: str, field: str):
  """Yields (text, None) per document, (text, repair) per repaired one (a REPAIRS reason) or
  (None, reason) per skipped record of one file. OSError means the file cannot be read."""
  if fmt == 'text':
    with open(path, 'rb') as fh:  # local: input files (see the module docstring)
      yield _decode(fh.read())
  elif fmt == 'jsonl':
    with open(path, 'rb') as fh:  # local: input files
      for line in fh:
        if line.strip():
          yield _json_field(line, field)
  elif fmt == 'parquet':
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
      pf = pq.ParquetFile(path)
    except pa.ArrowException as e:  # not Parquet / corrupt: the file cannot be read
      raise OSError(f'not a readable Parquet file ({type(e).__name__})') from e
    if field not in pf.schema_arrow.names:
      raise DataError(
        f'{path}: Parquet file has no column {field!r} (columns: '
        f'{", ".join(pf.schema_arrow.names)}); pass --field'
      )
    for batch in pf.iter_batches(columns=[field]):
      for value in batch.column(0).to_pylist():
        yield _checked(value.decode('utf-8', 'strict') if isinstance(value, bytes) else value)
  elif fmt == 'arrayrecord':
    from array_record.python.array_record_module import ArrayRecordReader

    reader = ArrayRecordReader(path)
    try:
      for i in range(0, reader.num_records(), 1024):
        for record in reader.read(list(range(i, min(i + 1024, reader.num_records())))):
          yield _decode(record)
    finally:
      reader.close()
  else:
    raise DataError(f'--format={fmt!r}: expected one of {FORMATS}')


def _decode(data: bytes):
  try:
    return _checked(data.decode('utf-8'))
  except UnicodeDecodeError:
    return None, 'non_utf8'


def _checked(text):
  if not isinstance(text, str):
    return None, 'missing_field'
  if not text:
    return None, 'empty'
  try:
    text.encode('utf-8')
  except UnicodeEncodeError:  # lone surrogates (JSON "\udc92"): valid pairs join, the rest U+FFFD
    return text.encode('utf-16', 'surrogatepass').decode('utf-16', 'replace'), 'lone_surrogate'
  return text, None


def _json_field(line: bytes, field: str):
  try:
    record = json.loads(line.decode('utf-8'))
  except UnicodeDecodeError:
    return None, 'non_utf8'
  except (json.JSONDecodeError, RecursionError):
    return None, 'bad_json'
  if not isinstance(record, dict) or field not in record:
    return None, 'missing_field'
  return _checked(record[field])


def unreadable_reason(e: OSError) -> str:
  return {
    PermissionError: 'permission_denied',
    IsADirectoryError: 'directory',
    FileNotFoundError: 'missing',
  }.get(type(e), 'unreadable')
