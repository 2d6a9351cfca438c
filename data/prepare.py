"""`python -m data.prepare --input=GLOB_OR_FILE --output=DIR [--format=...] [--field=text] [--tokenizer=...]`.

Tokenizes a corpus into the layout `data.sources` reads and `--config.data.path=DIR` trains on:

  DIR/train/tokens, DIR/heldout/tokens   zarr3 TensorStore arrays (smallest sufficient uint type);
                                         every document is followed by EOS
  DIR/train/offsets.npy, .../heldout/... int64 [documents + 1] document offsets
  DIR/metadata.json                      written last: a directory without it is never used;
                                         it records every file's size and sha256 (data.verify)

DIR may be local or gs://BUCKET/PATH (every write goes through `data.storage`, atomic per file);
the input files must be local.

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

import contextlib
import hashlib
import json
import os
import sys

import numpy as np

from data import pieces, sources, storage, verify
from data.errors import DataError
from data.inputs import (
  FORMATS,
  REPAIRS,
  SKIPS,
  infer_format,
  input_stat,
  list_inputs,
)
from data.pieces import (  # noqa: F401  (SPLITS and is_heldout are part of this module's API)
  SPLITS,
  is_heldout,
  piece_counts,
  piece_groups,
  run_tasks,
)
from data.tokenizer import get_tokenizer

MAX_SKIPPED_SHARE = 0.8  # more skipped records than this share of all records fails the run


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
  stats = [input_stat(os.path.join(root, f)) for f in rel]  # local: input files (data.inputs)
  listing = ''.join(f'{f}\t{size}\t{mtime}\n' for f, (size, mtime) in zip(rel, stats))
  plan = {
    'input': input_pattern,
    'group': [pieces.GROUP_BYTES, pieces.GROUP_FILES],
    'root': root,
    'format': fmt,
    'field': field,
    'tokenizer': tok.spec,
    'tokenizer_fingerprint': tok.fingerprint,
    'heldout_fraction': heldout_fraction,
    'file_list_sha256': hashlib.sha256(listing.encode()).hexdigest(),
  }
  meta_path, work = storage.join(output, 'metadata.json'), storage.join(output, '.work')
  if storage.isfile(output):
    raise DataError(
      f'--output={output!r} is an existing file; expected a directory (new or prepared)'
    )
  if storage.isfile(meta_path):
    try:
      meta = storage.read_json(meta_path)
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
  created = [d for d in (output, work) if not storage.exists(d)][:1]  # removed again on DataError
  try:
    return _prepare(
      output, work, plan, root, rel, stats, tok, processes, progress, source or input_pattern
    )
  except DataError:
    for d in created:
      with contextlib.suppress(OSError):  # what is left is never taken for a dataset (no metadata)
        storage.rmtree(d)
    raise


def _prepare(output, work, plan, root, rel, stats, tok, processes, progress, source) -> dict:
  try:
    if storage.is_remote(output):
      storage.probe(output)  # no bucket, no credentials: one line now, not after tokenizing
    storage.makedirs(work)
  except OSError as e:
    raise DataError(
      f'--output={output!r}: cannot create {work!r} ({e.strerror or type(e).__name__}); '
      'expected a writable directory'
    ) from None
  plan_path = storage.join(work, 'plan.json')
  if storage.isfile(plan_path):
    if storage.read_json(plan_path) != plan:
      raise DataError(
        f'--output={output!r} holds an interrupted preparation of other inputs or '
        'settings; remove it or choose another directory'
      )
  else:
    storage.write_json(plan_path, plan, indent=2)
  tasks = [
    {
      'files': g,
      'format': plan['format'],
      'field': plan['field'],
      'tokenizer': tok.spec,
      'heldout_fraction': plan['heldout_fraction'],
      'piece': storage.join(work, f'piece-{i:07d}.npz'),
    }
    for i, g in enumerate(piece_groups(root, rel, [size for size, _ in stats]))
  ]
  done = set(storage.listdir(work))  # one listing, not a request per piece
  counts = {
    t['piece']: piece_counts(t['piece']) for t in tasks if storage.basename(t['piece']) in done
  }
  todo = [t for t in tasks if t['piece'] not in counts]
  run_tasks(todo, counts, processes, progress, resumed=len(counts))
  meta = _assemble(output, work, tasks, counts, tok, plan, source)
  with contextlib.suppress(OSError):
    storage.rmtree(work)
  return meta


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
    storage.makedirs(storage.join(output, s))
    store = sources.create_token_array(
      storage.join(output, s, 'tokens'), int(offsets[-1]), tok.dtype
    )
    _write_stream(store, (_piece_array(t['piece'], f'{s}_tokens', move) for t in tasks))
    storage.save_npy(storage.join(output, s, 'offsets.npy'), offsets)  # atomic
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
  storage.write_json(storage.join(output, 'metadata.json'), meta, indent=2)  # last
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
  with storage.open_npz(piece) as z:
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
    where = str(e.filename or '')  # a file of the dataset, else (a buffer, the store) the dataset
    where = where if where.startswith(storage.resolve(output)) else output
    message = (
      f'cannot write {where}: {e.strerror or e}; finished pieces are kept '
      f'in {storage.join(output, ".work")}: rerun the same command to resume'
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
