"""`python -m data.prepare --input=GLOB_OR_FILE --output=DIR [--format=...] [--field=text] [--tokenizer=...]`.

Tokenizes a corpus into the layout `data.sources` reads and `--config.data.path=DIR` trains on:

  DIR/train/tokens, DIR/heldout/tokens   zarr3 TensorStore arrays (smallest sufficient uint type);
                                         every document is followed by EOS
  DIR/train/offsets.npy, .../heldout/... int64 [documents + 1] document offsets
  DIR/metadata.json                      written last: a directory without it is never used;
                                         it records every file's size and sha256 (data.verify)

Inputs: text files (one document per file), JSONL (one document per line, `--field`), Parquet
(column `--field`) or ArrayRecord (one UTF-8 document per record). A document goes to held-out when
a hash of its key (file path, plus record index for record formats) falls below
`--heldout_fraction`, so the split is stable across machines and runs (paths are relative to the
inputs' common directory, never absolute). When that leaves held-out empty although there are at
least two documents (and the fraction is above 0), the one training document with the smallest
sha256(key) is moved to held-out instead, so evaluation always has data.

Files are tokenized in groups of about 4 MB, in parallel by `--processes` spawned workers; each
group becomes one piece file under DIR/.work/, written atomically, and a rerun after an
interruption skips finished pieces. Single bad
records (not UTF-8, not JSON, no such field, empty) are skipped and counted in metadata.json;
text with lone surrogates (escaped in JSON, e.g. "\\udc92") is kept with U+FFFD in their place and
counted under `repaired`; an input file that cannot be read (permission, a directory, I/O error) is
skipped and named under `skipped_files`. Problems with the whole input (no files, no readable file,
a Parquet file without the column, a `--field` absent from every record, more than
MAX_SKIPPED_SHARE of the records skipped, an `--output` that is not a directory, a tokenizer that
does not load) stop with one line and leave nothing behind that this run created.
"""

import glob
import hashlib
import json
import multiprocessing
import os
import shutil
import sys
import time

import numpy as np

from data import sources, verify
from data.errors import DataError
from data.tokenizer import get_tokenizer

FORMATS = ('text', 'jsonl', 'parquet', 'arrayrecord')
SPLITS = ('train', 'heldout')
SKIPS = ('non_utf8', 'bad_json', 'missing_field', 'empty')
REPAIRS = ('lone_surrogate',)  # records kept with U+FFFD in place of what could not be encoded
MAX_SKIPPED_SHARE = 0.8  # more skipped records than this share of all records fails the run
_EXTENSIONS = {
  '.jsonl': 'jsonl',
  '.json': 'jsonl',
  '.parquet': 'parquet',
  '.arrayrecord': 'arrayrecord',
  '.array_record': 'arrayrecord',
}
_ENCODE_BATCH = 256  # documents per tokenizer call


def is_heldout(key: str, fraction: float) -> bool:
  """A document is held out when the first 32 bits of sha256(key), as a fraction, fall below it.
  Keys are relative paths (never absolute), so the split does not depend on where the input lies.
  If this picks no document among >= 2 (fraction > 0), prepare moves the training document with the
  smallest sha256(key) to held-out (`_forced_heldout`), so held-out is never empty."""
  return int(hashlib.sha256(key.encode()).hexdigest()[:8], 16) / 2**32 < fraction


def list_inputs(pattern: str) -> tuple[str, list[str]]:
  """(common root, sorted relative paths) of the files matching a glob or naming one file."""
  matches = glob.glob(os.path.expanduser(pattern), recursive=True)
  files = sorted(
    f for f in matches if not os.path.isdir(f)
  )  # other unreadable ones are skipped later
  if not files:
    raise DataError(
      f'--input={pattern!r} matches no files'
      + (' (only directories; use a glob such as DIR/**/*.txt)' if matches else '')
    )
  files = [os.path.abspath(f) for f in files]
  root = os.path.dirname(files[0]) if len(files) == 1 else os.path.commonpath(files)
  return root, [os.path.relpath(f, root) for f in files]


def infer_format(rel_paths: list[str]) -> str:
  """The format named by the files' extension (all must agree), else text."""
  kinds = {_EXTENSIONS.get(os.path.splitext(f)[1].lower(), 'text') for f in rel_paths}
  return kinds.pop() if len(kinds) == 1 else 'text'


def read_records(path: str, fmt: str, field: str):
  """Yields (text, None) per document, (text, repair) per repaired one (a REPAIRS reason) or
  (None, reason) per skipped record of one file. OSError means the file cannot be read."""
  if fmt == 'text':
    with open(path, 'rb') as fh:
      yield _decode(fh.read())
  elif fmt == 'jsonl':
    with open(path, 'rb') as fh:
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


_TOKENIZERS = {}
GROUP_BYTES = 4 << 20  # input bytes per piece file (the unit of parallel work and of resume)
GROUP_FILES = 256  # at most this many input files per piece file


def _tokenizer(spec: str):
  """One tokenizer per spec per process (workers load the file once)."""
  if spec not in _TOKENIZERS:
    _TOKENIZERS[spec] = get_tokenizer(spec)
  return _TOKENIZERS[spec]


def _unreadable_reason(e: OSError) -> str:
  return {
    PermissionError: 'permission_denied',
    IsADirectoryError: 'directory',
    FileNotFoundError: 'missing',
  }.get(type(e), 'unreadable')


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
    counts['unreadable'] = {rel: _unreadable_reason(e)}
    return {s: [] for s in SPLITS}, counts


def _tokenize_file(task: dict, path: str, rel: str) -> tuple[dict, dict]:
  tok = _tokenizer(task['tokenizer'])
  ids = {s: [] for s in SPLITS}
  pending = {s: [] for s in SPLITS}
  counts = _new_counts(os.path.getsize(path))
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
  tmp = task['piece'] + f'.tmp{os.getpid()}.npz'
  np.savez(tmp, **arrays)
  os.replace(tmp, task['piece'])
  return counts


def _groups(root: str, rel: list[str], sizes: list[int]) -> list[list[tuple[str, str]]]:
  """Consecutive files in groups of about GROUP_BYTES (at most GROUP_FILES files)."""
  groups, current, size = [], [], 0
  for f, n in zip(rel, sizes):
    if current and (size + n > GROUP_BYTES or len(current) >= GROUP_FILES):
      groups.append(current)
      current, size = [], 0
    current.append((os.path.join(root, f), f))
    size += n
  return groups + [current]


def _piece_counts(piece: str) -> dict:
  with np.load(piece) as z:
    return json.loads(z['counts'].tobytes())


def _write_json(path: str, obj) -> None:
  with open(path + '.tmp', 'w') as fh:
    json.dump(obj, fh, indent=2)
  os.replace(path + '.tmp', path)


def prepare_dataset(
  input_pattern: str,
  output: str,
  *,
  fmt: str = '',
  field: str = 'text',
  tokenizer: str = 'byte',
  heldout_fraction: float = 0.02,
  processes: int = 1,
  files: tuple[str, list[str]] | None = None,
  source: str = '',
  progress: bool = False,
) -> dict:
  """Prepares (or resumes preparing) `output`; returns its metadata. `files=(root, rel_paths)`
  replaces the glob (the default corpus uses it)."""
  if not 0 <= heldout_fraction < 1:
    raise DataError(f'--heldout_fraction={heldout_fraction}: expected a value in [0, 1)')
  root, rel = files if files is not None else list_inputs(input_pattern)
  fmt = fmt or infer_format(rel)
  if fmt not in FORMATS:
    raise DataError(f'--format={fmt!r}: expected one of {FORMATS}')
  tok = get_tokenizer(tokenizer)
  stats = [_stat(os.path.join(root, f)) for f in rel]
  listing = ''.join(f'{f}\t{size}\t{mtime}\n' for f, (size, mtime) in zip(rel, stats))
  plan = {
    'input': input_pattern,
    'group': [GROUP_BYTES, GROUP_FILES],
    'root': root,
    'format': fmt,
    'field': field,
    'tokenizer': tok.spec,
    'tokenizer_fingerprint': tok.fingerprint,
    'heldout_fraction': heldout_fraction,
    'file_list_sha256': hashlib.sha256(listing.encode()).hexdigest(),
  }
  meta_path, work = os.path.join(output, 'metadata.json'), os.path.join(output, '.work')
  if os.path.exists(output) and not os.path.isdir(output):
    raise DataError(
      f'--output={output!r} is an existing file; expected a directory (new or prepared)'
    )
  if os.path.isfile(meta_path):
    try:
      with open(meta_path) as fh:
        meta = json.load(fh)
    except (OSError, ValueError) as e:
      raise DataError(
        f'--output={output!r} holds an unreadable metadata.json ({type(e).__name__}); '
        'remove it or choose another directory'
      ) from None
    if not isinstance(meta, dict) or meta.get('plan') != plan:
      raise DataError(
        f'--output={output!r} already holds a different prepared dataset; choose another directory'
      )
    return meta
  created = [d for d in (output, work) if not os.path.lexists(d)][:1]  # removed again on DataError
  try:
    return _prepare(
      output, work, plan, root, rel, stats, tok, processes, progress, source or input_pattern
    )
  except DataError:
    for d in created:
      shutil.rmtree(d, ignore_errors=True)
    raise


def _stat(path: str) -> tuple[int, int]:
  """(size, mtime_ns); (0, 0) for a path that cannot be stat'ed (its reading fails and is counted)."""
  try:
    st = os.stat(path)
    return st.st_size, st.st_mtime_ns
  except OSError:
    return 0, 0


def _prepare(output, work, plan, root, rel, stats, tok, processes, progress, source) -> dict:
  try:
    os.makedirs(work, exist_ok=True)
  except OSError as e:
    raise DataError(
      f'--output={output!r}: cannot create {work!r} ({e.strerror or type(e).__name__}); '
      'expected a writable directory'
    ) from None
  plan_path = os.path.join(work, 'plan.json')
  if os.path.isfile(plan_path):
    with open(plan_path) as fh:
      if json.load(fh) != plan:
        raise DataError(
          f'--output={output!r} holds an interrupted preparation of other inputs or '
          'settings; remove it or choose another directory'
        )
  else:
    _write_json(plan_path, plan)
  tasks = [
    {
      'files': g,
      'format': plan['format'],
      'field': plan['field'],
      'tokenizer': tok.spec,
      'heldout_fraction': plan['heldout_fraction'],
      'piece': os.path.join(work, f'piece-{i:07d}.npz'),
    }
    for i, g in enumerate(_groups(root, rel, [size for size, _ in stats]))
  ]
  counts = {t['piece']: _piece_counts(t['piece']) for t in tasks if os.path.isfile(t['piece'])}
  todo = [t for t in tasks if t['piece'] not in counts]
  _run_tasks(todo, counts, processes, progress, resumed=len(counts))
  meta = _assemble(output, work, tasks, counts, tok, plan, source)
  shutil.rmtree(work, ignore_errors=True)
  return meta


def _run_tasks(todo, counts, processes, progress, resumed):
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


def _assemble(output, work, tasks, counts, tok, plan, source) -> dict:
  """Concatenates the pieces into the split arrays and offsets, then writes metadata.json last."""
  skipped = {r: sum(c['skipped'][r] for c in counts.values()) for r in SKIPS}
  unreadable = {}
  for c in counts.values():
    for f, why in c.get('unreadable', {}).items():
      unreadable.setdefault(why, []).append(f)
  _check_input(plan, tasks, counts, skipped, unreadable)
  move = _forced_heldout(tasks, counts, plan)  # (piece, train index) or None
  lengths = {s: [] for s in SPLITS}
  for t in tasks:
    for s in SPLITS:
      lengths[s].append(_piece_array(t['piece'], f'{s}_lengths', move))
  meta_counts = {}
  for s in SPLITS:
    doc_lengths = np.concatenate(lengths[s])
    offsets = np.concatenate([[0], np.cumsum(doc_lengths)]).astype(np.int64)
    if s == 'train' and offsets[-1] == 0:
      raise DataError(
        f'no training documents in {plan["input"]!r} ({len(tasks)} files); '
        'check --format and --field (skipped records are counted per reason)'
      )
    os.makedirs(os.path.join(output, s), exist_ok=True)
    store = sources.create_token_array(
      os.path.join(output, s, 'tokens'), int(offsets[-1]), tok.dtype
    )
    _write_stream(store, (_piece_array(t['piece'], f'{s}_tokens', move) for t in tasks))
    np.save(os.path.join(output, s, 'offsets.tmp.npy'), offsets)
    os.replace(os.path.join(output, s, 'offsets.tmp.npy'), os.path.join(output, s, 'offsets.npy'))
    meta_counts[s] = (len(doc_lengths), int(offsets[-1]))
  total = lambda key: {s: sum(c[key][s] for c in counts.values()) for s in SPLITS}
  text_bytes = total('text_bytes')
  if move:
    moved_bytes = counts[move[0]]['min_train'][2]
    text_bytes = {
      'train': text_bytes['train'] - moved_bytes,
      'heldout': text_bytes['heldout'] + moved_bytes,
    }
  meta = {
    'format_version': 2,
    'source': source,
    'root': plan['root'],
    'format': plan['format'],
    'field': plan['field'],
    'files': sum(len(t['files']) for t in tasks),
    'tokenizer': {
      'spec': tok.spec,
      'fingerprint': tok.fingerprint,
      'vocab_size': tok.vocab_size,
      'eos_id': tok.eos_id,
      'byte_level': tok.byte_level,
    },
    'vocab_size': tok.vocab_size,
    'dtype': np.dtype(tok.dtype).name,
    'split': {
      'heldout_fraction': plan['heldout_fraction'],
      'rule': 'sha256(key)[:32 bits] < heldout_fraction; key = file path (text) or path#record, '
      'relative to root; if none and >= 2 documents: the smallest sha256(key) one',
      'forced': bool(move),
    },
    'documents': {s: meta_counts[s][0] for s in SPLITS},
    'tokens': {s: meta_counts[s][1] for s in SPLITS},
    'text_bytes': text_bytes,
    'skipped': skipped,
    'repaired': {r: sum(c.get('repaired', {}).get(r, 0) for c in counts.values()) for r in REPAIRS},
    'skipped_files': {why: sorted(fs) for why, fs in sorted(unreadable.items())},
    'plan': plan,
  }
  meta['fingerprint'] = hashlib.sha256(
    json.dumps([plan, meta['tokens'], meta['documents']], sort_keys=True).encode()
  ).hexdigest()[:16]
  meta['checksums'] = verify.record(output, SPLITS)  # size and sha256 of every stored file
  _write_json(os.path.join(output, 'metadata.json'), meta)
  return meta


def _check_input(plan, tasks, counts, skipped, unreadable) -> None:
  """Fails (one line) on input that would make a useless dataset: nothing readable, the field absent
  from every record, or more than MAX_SKIPPED_SHARE of the records skipped."""
  n_files = sum(len(t['files']) for t in tasks)
  bad = [f'{f} ({why})' for why, fs in unreadable.items() for f in fs]
  if len(bad) == n_files:
    raise DataError(
      f'none of the {n_files} files of --input={plan["input"]!r} can be read '
      f'(e.g. {", ".join(sorted(bad)[:3])}); expected readable files'
    )
  docs = sum(len(_piece_array(t['piece'], f'{s}_lengths', None)) for t in tasks for s in SPLITS)
  records = docs + sum(skipped.values())
  if plan['format'] in ('jsonl', 'parquet') and records and skipped['missing_field'] == records:
    raise DataError(
      f'--field={plan["field"]!r} is absent (or not a string) in every one of the '
      f'{records} records of --input={plan["input"]!r}; expected a text field, pass --field'
    )
  if records and sum(skipped.values()) > MAX_SKIPPED_SHARE * records:
    reasons = ', '.join(f'{r} {n}' for r, n in skipped.items() if n)
    raise DataError(
      f'{sum(skipped.values())} of the {records} records of --input={plan["input"]!r} are '
      f'skipped ({reasons}), more than {MAX_SKIPPED_SHARE:.0%}; check --format and --field'
    )


def _forced_heldout(tasks, counts, plan):
  """(piece, index in its train list) of the document moved to held-out when the hash rule picked
  none among >= 2 documents (the smallest sha256(key) training document), else None."""
  if plan['heldout_fraction'] <= 0:
    return None
  pieces = [t['piece'] for t in tasks]
  docs = {s: sum(len(_piece_array(p, f'{s}_lengths', None)) for p in pieces) for s in SPLITS}
  if docs['heldout'] or docs['train'] < 2:
    return None
  best = min((counts[p]['min_train'][0], p) for p in pieces if counts[p].get('min_train'))
  return best[1], counts[best[1]]['min_train'][1]


def _piece_array(piece, key, move):
  """One array of a piece file, with the document `move` names taken from train into held-out."""
  with np.load(piece) as z:
    arr = z[key]
    if not move or move[0] != piece:
      return arr
    split, what = key.split('_')
    train_lengths, j = z['train_lengths'], move[1]
    if what == 'lengths':
      return np.delete(arr, j) if split == 'train' else train_lengths[j : j + 1]
    start = int(train_lengths[:j].sum())
    end = start + int(train_lengths[j])
    train = z['train_tokens']
    return np.concatenate([train[:start], train[end:]]) if split == 'train' else train[start:end]


def _write_stream(store, arrays) -> None:
  """Writes the concatenation of `arrays` into `store` in whole shards."""
  buf, buffered, at, pending = [], 0, 0, []
  for arr in arrays:
    buf.append(arr)
    buffered += arr.size
    while buffered >= sources.SHARD_TOKENS:
      flat = np.concatenate(buf)
      n = sources.SHARD_TOKENS
      pending.append(store[at : at + n].write(flat[:n]))
      at, buf, buffered = at + n, [flat[n:]], flat.size - n
      if len(pending) > 4:
        _written(pending.pop(0))
  if buffered:
    flat = np.concatenate(buf)
    pending.append(store[at : at + flat.size].write(flat))
  for p in pending:
    _written(p)


def _written(future) -> None:
  """Waits for a TensorStore write; its failure (e.g. no space left) becomes an OSError."""
  try:
    future.result()
  except ValueError as e:
    raise OSError(str(e).splitlines()[0][:300]) from None


def prepare_or_exit(input_pattern: str, output: str, **kwargs) -> dict:
  """`prepare_dataset` for the command line: bad input or a failed write (disk full, read-only
  storage) ends in one line and exit status 1. A failed write keeps the finished pieces, so
  rerunning the same command resumes."""
  try:
    return prepare_dataset(input_pattern, output, **kwargs)
  except DataError as e:
    message = str(e)
  except OSError as e:
    message = (
      f'cannot write {e.filename or output}: {e.strerror or e}; finished pieces are kept '
      f'in {os.path.join(output, ".work")}: rerun the same command to resume'
    )
  print(f'error: {message}', file=sys.stderr)
  sys.exit(1)


def main(argv):
  from absl import flags

  if len(argv) > 1:
    raise SystemExit(f'error: unexpected arguments: {argv[1:]}')
  f = flags.FLAGS
  meta = prepare_or_exit(
    f.input,
    f.output,
    fmt=f.format or '',
    field=f.field,
    tokenizer=f.tokenizer,
    heldout_fraction=f.heldout_fraction,
    processes=f.processes,
    progress=True,
  )
  print(
    json.dumps(
      {
        k: meta[k]
        for k in (
          'documents',
          'tokens',
          'skipped',
          'repaired',
          'skipped_files',
          'dtype',
          'vocab_size',
        )
      }
    )
  )


def run():
  from absl import app, flags

  flags.DEFINE_string('input', None, 'Glob of input files, or one file.')
  flags.DEFINE_string('output', None, 'Dataset directory to write (resumed if interrupted).')
  flags.DEFINE_enum(
    'format', None, FORMATS, 'Input format; default: from the file extension, else text.'
  )
  flags.DEFINE_string('field', 'text', 'JSONL field / Parquet column holding the text.')
  flags.DEFINE_string(
    'tokenizer', 'byte', 'byte | sentencepiece:PATH.model | hf:PATH/tokenizer.json'
  )
  flags.DEFINE_float('heldout_fraction', 0.02, 'Share of documents held out (by key hash).')
  flags.DEFINE_integer('processes', os.cpu_count() or 1, 'Tokenizer worker processes.')
  flags.mark_flags_as_required(['input', 'output'])
  app.run(main)


if __name__ == '__main__':
  run()
