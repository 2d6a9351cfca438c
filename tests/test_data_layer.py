"""The data layer: prepare (formats, tokenizers, parallel, resume, bad input), packing through the
model, packed shards and resume, and training on a prepared dataset through --config.data.path."""

import json
import os
import shutil
import subprocess
import sys

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from configs import schema, tiny
from data import corpus, pieces, pipeline, prepare, sources
from data.errors import DataError
from data.tokenizer import get_tokenizer
from tests.tokenizer_files import write_bpe_tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCS = [
  f'Document {i}: the quick brown fox jumps over {i * 7} lazy dogs; café number {i}.'
  for i in range(24)
] + ['Short one.', 'x']


@pytest.fixture(scope='module')
def tokenizer_files(tmp_path_factory):
  """A tiny SentencePiece model and a tiny HF byte-level BPE, trained here on DOCS (no downloads)."""
  import sentencepiece as spm

  d = tmp_path_factory.mktemp('tok')
  spm.SentencePieceTrainer.train(
    sentence_iterator=iter(DOCS * 4),
    model_prefix=str(d / 'sp'),
    vocab_size=60,
    hard_vocab_limit=False,
    character_coverage=1.0,
    minloglevel=2,
  )
  write_bpe_tokenizer(DOCS, str(d / 'tokenizer.json'))
  return {
    'byte': 'byte',
    'sentencepiece': f'sentencepiece:{d / "sp.model"}',
    'hf': f'hf:{d / "tokenizer.json"}',
  }


def write_inputs(directory, fmt, docs=DOCS, field='text'):
  """`docs` in `fmt` under `directory` (two files for record formats); returns the glob."""
  os.makedirs(directory, exist_ok=True)
  halves = [docs[::2], docs[1::2]]
  if fmt == 'text':
    for i, doc in enumerate(docs):
      with open(os.path.join(directory, f'doc{i:03d}.txt'), 'w') as fh:
        fh.write(doc)
    return os.path.join(directory, '*.txt')
  for i, half in enumerate(halves):
    path = os.path.join(directory, f'part{i}.{fmt}')
    if fmt == 'jsonl':
      with open(path, 'w') as fh:
        fh.writelines(json.dumps({field: doc, 'id': j}) + '\n' for j, doc in enumerate(half))
    elif fmt == 'parquet':
      import pyarrow as pa
      import pyarrow.parquet as pq

      pq.write_table(pa.table({field: half}), path)
    else:
      from array_record.python.array_record_module import ArrayRecordWriter

      writer = ArrayRecordWriter(path, 'group_size:1')
      for doc in half:
        writer.write(doc.encode('utf-8'))
      writer.close()
  return os.path.join(directory, f'*.{fmt}')


def documents(directory, split):
  s = sources.open_split(directory, split)
  tokens = s.tokens[:]
  return [tokens[a:b] for a, b in zip(s.offsets[:-1], s.offsets[1:])]


@pytest.mark.parametrize('fmt', prepare.FORMATS)
def test_round_trip_every_format_and_tokenizer(tmp_path, tokenizer_files, fmt):
  pattern = write_inputs(tmp_path / 'in', fmt)
  for name, spec in tokenizer_files.items():
    out = str(tmp_path / name)
    meta = prepare.prepare_dataset(pattern, out, tokenizer=spec, heldout_fraction=0.3)
    tok = get_tokenizer(spec)
    assert meta['format'] == fmt and meta['tokenizer']['fingerprint'] == tok.fingerprint
    assert meta['dtype'] == {'byte': 'uint16', 'sentencepiece': 'uint8', 'hf': 'uint16'}[name]
    assert meta['documents']['train'] > 0 and meta['documents']['heldout'] > 0
    decoded = []
    for split in prepare.SPLITS:
      for ids in documents(out, split):
        assert ids[-1] == tok.eos_id and (ids[:-1] != tok.eos_id).all()
        decoded.append(tok.decode(ids))
    assert sorted(decoded) == sorted(DOCS)
    assert sum(meta['skipped'].values()) == 0 and not os.path.exists(os.path.join(out, '.work'))
    assert corpus.dataset_tokenizer(out).fingerprint == tok.fingerprint


def test_parallel_prepare_equals_serial_and_resume_skips_done_files(tmp_path, monkeypatch):
  monkeypatch.setattr(pieces, 'GROUP_FILES', 1)  # one piece per file: many pieces to resume
  pattern = write_inputs(tmp_path / 'in', 'text')
  serial = prepare.prepare_dataset(pattern, str(tmp_path / 'serial'))
  parallel = prepare.prepare_dataset(pattern, str(tmp_path / 'parallel'), processes=2)
  assert parallel['fingerprint'] == serial['fingerprint']
  for split in prepare.SPLITS:
    for a, b in zip(
      documents(str(tmp_path / 'serial'), split), documents(str(tmp_path / 'parallel'), split)
    ):
      np.testing.assert_array_equal(a, b)
  real, calls = pieces.tokenize_file, []

  def dies_on_the_tenth(task, path, rel):
    calls.append(rel)
    if len(calls) == 10:
      raise KeyboardInterrupt  # as if the run were interrupted
    return real(task, path, rel)

  out = str(tmp_path / 'resumed')
  monkeypatch.setattr(pieces, 'tokenize_file', dies_on_the_tenth)
  with pytest.raises(KeyboardInterrupt):
    prepare.prepare_dataset(pattern, out)
  with pytest.raises(DataError, match='metadata.json'):
    sources.open_split(out, 'train')  # nothing half-written looks complete
  with pytest.raises(DataError, match='interrupted preparation'):
    prepare.prepare_dataset(pattern, out, heldout_fraction=0.5)
  calls.clear()
  monkeypatch.setattr(pieces, 'tokenize_file', lambda t, p, r: calls.append(r) or real(t, p, r))
  assert prepare.prepare_dataset(pattern, out)['fingerprint'] == serial['fingerprint']
  assert len(calls) == len(DOCS) - 9  # the 9 finished files were not tokenized again
  with pytest.raises(DataError, match='already holds a different'):
    prepare.prepare_dataset(pattern, out, heldout_fraction=0.5)


def test_bad_input(tmp_path, tokenizer_files):
  one_line = lambda e: '\n' not in str(e.value)
  with pytest.raises(DataError, match='matches no files') as e:
    prepare.prepare_dataset(str(tmp_path / 'nothing*.txt'), str(tmp_path / 'o1'))
  assert one_line(e)
  (tmp_path / 'txt').mkdir()
  (tmp_path / 'txt' / 'good.txt').write_text('fine text')
  (tmp_path / 'txt' / 'bad.txt').write_bytes(b'caf\xe9 latin-1')
  meta = prepare.prepare_dataset(str(tmp_path / 'txt' / '*.txt'), str(tmp_path / 'o2'))
  assert meta['skipped']['non_utf8'] == 1 and meta['documents']['train'] == 1
  (tmp_path / 'bad.jsonl').write_bytes(
    b'{"text": "ok"}\nnot json\n{"other": 1}\n{"text": 5}\n'
    b'{"text": ""}\n\xff\xfe\n{"text": "also ok"}\n'
  )
  meta = prepare.prepare_dataset(str(tmp_path / 'bad.jsonl'), str(tmp_path / 'o3'))
  assert meta['skipped'] == {'non_utf8': 1, 'bad_json': 1, 'missing_field': 2, 'empty': 1}
  assert meta['documents']['train'] + meta['documents']['heldout'] == 2
  pattern = write_inputs(tmp_path / 'pq', 'parquet', field='body')
  with pytest.raises(DataError, match="no column 'text'.*body") as e:
    prepare.prepare_dataset(pattern, str(tmp_path / 'o4'))
  assert one_line(e)
  assert not os.path.exists(tmp_path / 'o4' / 'metadata.json')
  assert prepare.prepare_dataset(pattern, str(tmp_path / 'o5'), field='body')['documents']['train']
  (tmp_path / 'garbage.model').write_bytes(b'not a model')
  (tmp_path / 'garbage.json').write_text('{"version": "nope"}')
  for spec in (
    f'sentencepiece:{tmp_path / "garbage.model"}',
    f'hf:{tmp_path / "garbage.json"}',
    f'hf:{tmp_path / "missing.json"}',
  ):
    with pytest.raises(DataError, match='does not load|cannot read') as e:
      prepare.prepare_dataset(str(tmp_path / 'bad.jsonl'), str(tmp_path / 'o6'), tokenizer=spec)
    assert one_line(e)
  for make_cfg in (lambda p: schema.DataConfig(path=p),):
    with pytest.raises(DataError, match='missing metadata.json') as e:
      corpus.resolve_dataset(make_cfg(str(tmp_path / 'txt')))
    assert one_line(e)
  with pytest.raises(DataError, match='model.vocab_size=256') as e:
    corpus.check_vocab(str(tmp_path / 'o2'), 256)  # byte level needs 257
  assert one_line(e)
  corpus.check_vocab(str(tmp_path / 'o2'), 257)


def packed_data(vocab=0):
  """40 documents of 2..30 tokens; distinct tokens (every pair identifies itself) unless `vocab`."""
  rng = np.random.default_rng(0)
  lengths = rng.integers(2, 31, size=40)
  offsets = np.concatenate([[0], np.cumsum(lengths)])
  tokens = np.arange(1, offsets[-1] + 1, dtype=np.uint16)
  return (tokens % vocab if vocab else tokens), offsets


def pairs_of(batches):
  out = []
  for b in batches:
    m = b['weights'] > 0
    out += list(zip(b['inputs'][m].tolist(), b['targets'][m].tolist()))
  return out


def test_packed_rows_cover_every_pair_once_per_epoch():
  tokens, offsets = packed_data()
  src = sources.PackedSource(tokens, offsets, 16, seed=3)
  rows = src.read_batch(np.arange(len(src)))  # epoch 0
  expected = [
    (int(tokens[a + i]), int(tokens[a + i + 1]))
    for a, b in zip(offsets[:-1], offsets[1:])
    for i in range(b - a - 1)
  ]
  assert sorted(pairs_of([rows])) == sorted(expected)
  seg, pos, w = rows['segment_ids'], rows['positions'], rows['weights']
  assert ((seg == 0) == (w == 0)).all() and (w == 0).sum() == len(src) * 16 - len(expected)
  starts = np.diff(seg, axis=1, prepend=0) != 0
  assert (pos[starts] == 0).all() and (pos[~starts & (seg > 0)] > 0).all()  # restart per segment
  again = src.read_batch(np.arange(len(src), 2 * len(src)))  # epoch 1: other rows, same pairs
  assert sorted(pairs_of([again])) == sorted(expected)
  assert not np.array_equal(again['inputs'], rows['inputs'])


def test_packing_never_attends_across_documents():
  """Through the model: a segment's logits equal the model run on it alone, and perturbing one
  document's tokens leaves the other documents' logits unchanged (in both directions)."""
  from flax import nnx

  from model.transformer import Transformer

  cfg = schema.load(tiny.get_config(), jax.device_count())
  model = Transformer(cfg.model, rngs=nnx.Rngs(0))
  tokens, offsets = packed_data(vocab=257)
  batch = sources.PackedSource(tokens, offsets, 32, seed=0).read_batch([0, 1])
  fwd = nnx.jit(
    lambda m, inputs, seg: m(inputs, positions_BL=batch['positions'], segment_ids_BL=seg)[0]
  )
  logits = fwd(model, batch['inputs'], batch['segment_ids'])
  seg = batch['segment_ids'][0]
  one, two = np.flatnonzero(seg == 1), np.flatnonzero(seg == 2)
  assert len(one) > 1 and len(two) > 1
  alone = model(batch['inputs'][:1, two])[0][0]  # positions 0..n-1 by default, nothing before
  np.testing.assert_allclose(logits[0, two], alone, rtol=1e-5, atol=1e-5)
  for changed, kept in ((one, two), (two, one)):  # earlier doc -> later, and later -> earlier
    perturbed = batch['inputs'].copy()
    perturbed[0, changed] = (perturbed[0, changed] + 17) % 257
    after = fwd(model, perturbed, batch['segment_ids'])
    np.testing.assert_array_equal(after[0, kept], logits[0, kept])
    assert not np.allclose(after[0, changed], logits[0, changed])
  perturbed = batch['inputs'].copy()
  perturbed[0, one] = (perturbed[0, one] + 17) % 257
  no_mask = np.ones_like(batch['segment_ids'])  # one segment per row: the test has power
  assert not np.allclose(
    fwd(model, perturbed, no_mask)[0, two], fwd(model, batch['inputs'], no_mask)[0, two]
  )


def test_packed_process_shards_are_disjoint_and_cover():
  tokens, offsets = packed_data()
  make = lambda p, n, b: pipeline.train_dataset(
    sources.Split(tokens, offsets),
    schema.DataConfig(seed=1, packing=True),
    seq_len=16,
    global_batch_size=b,
    process_index=p,
    process_count=n,
  )
  rows = len(sources.PackedSource(tokens, offsets, 16, 0))
  single = [next(it) for it in [iter(make(0, 1, 4))] for _ in range(rows // 4)]
  shards = [[next(it) for it in [iter(make(p, 2, 4))] for _ in range(rows // 4)] for p in (0, 1)]
  a, b = pairs_of(shards[0]), pairs_of(shards[1])
  assert not set(a) & set(b) and sorted(a + b) == sorted(pairs_of(single))
  for k, batch in enumerate(single):  # process p gets rows p, p+2 of every global batch of 4
    for p in (0, 1):
      np.testing.assert_array_equal(shards[p][k]['inputs'], batch['inputs'][p::2])


@pytest.fixture(scope='module')
def prepared(tmp_path_factory):
  """A byte-level dataset of 40 stdlib files, prepared through the CLI (2 processes)."""
  tmp = tmp_path_factory.mktemp('prepared')
  root, files = corpus.stdlib_files()
  src = tmp / 'src'
  src.mkdir()
  for f in files[100:140]:
    with open(os.path.join(root, f), 'rb') as fh:
      (src / f.replace('/', '_')).write_bytes(fh.read())
  out = tmp / 'ds'
  proc = subprocess.run(
    [
      sys.executable,
      '-m',
      'data.prepare',
      f'--input={src}/*.py',
      f'--output={out}',
      '--processes=2',
      '--heldout_fraction=0.1',
    ],
    cwd=ROOT,
    capture_output=True,
    text=True,
    timeout=120,
  )
  assert proc.returncode == 0, proc.stderr
  assert 'prepare: 1/1 pieces' in proc.stderr and json.loads(proc.stdout.splitlines()[-1])['tokens']
  return str(out)


@pytest.mark.parametrize('packing', [False, True])
def test_resume_mid_epoch_through_orbax_on_tensorstore(tmp_path, prepared, packing):
  split = sources.open_split(prepared, 'train')
  make = lambda: iter(
    pipeline.train_dataset(
      split, schema.DataConfig(seed=5, packing=packing), seq_len=64, global_batch_size=4
    )
  )
  it = make()
  [next(it) for _ in range(3)]
  with ocp.CheckpointManager(tmp_path / 'ckpt') as mngr:
    mngr.save(3, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(it)))
    mngr.wait_until_finished()
  expected = [next(it) for _ in range(4)]
  fresh = make()
  with ocp.CheckpointManager(tmp_path / 'ckpt') as mngr:
    mngr.restore(3, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(fresh)))
  for x, y in zip([next(fresh) for _ in range(4)], expected):
    assert set(x) == set(y)
    for k in x:
      np.testing.assert_array_equal(x[k], y[k])


@pytest.mark.slow  # ~14 s: two trainings on a prepared store
def test_trains_on_prepared_dataset_and_refuses_a_switch(tmp_path, prepared, tokenizer_files):
  from model.config import ConfigError
  from train.train import train_and_evaluate

  data = str(tmp_path / 'data')
  shutil.copytree(prepared, data)
  workdir = tmp_path / 'run'
  proc = subprocess.run(
    [
      sys.executable,
      '-m',
      'train.train',
      '--config=configs/tiny.py',
      f'--workdir={workdir}',
      f'--config.data.path={data}',
      '--config.data.packing=True',
      '--config.train.steps=16',
      '--config.train.log_every=4',
    ],
    cwd=ROOT,
    capture_output=True,
    text=True,
    timeout=240,
  )
  assert proc.returncode == 0, proc.stderr[-2000:]
  with open(workdir / 'metrics.jsonl') as f:
    losses = [r['loss'] for r in map(json.loads, f) if 'loss' in r]
  assert losses[-1] < losses[0] - 0.5
  with open(workdir / 'dataset.json') as f:
    assert json.load(f)['dataset'] == corpus.load_metadata(data)['fingerprint']
  c = tiny.get_config()
  c.data.path, c.data.packing = data, True
  cfg = schema.load(c, jax.device_count())
  shutil.rmtree(data)  # the same path, re-prepared with another tokenizer
  prepare.prepare_dataset(
    os.path.join(prepared, '..', 'src', '*.py'),
    data,
    tokenizer=tokenizer_files['hf'],
    heldout_fraction=0.1,
  )
  with pytest.raises(
    DataError, match=r'trained with tokenizer byte-v1 .* hf-.*use a new --workdir'
  ):
    train_and_evaluate(cfg, str(workdir))
  c.data.path = prepared  # another dataset (same tokenizer)
  with pytest.raises((DataError, ConfigError), match='use a new --workdir'):
    train_and_evaluate(schema.load(c, jax.device_count()), str(workdir))
  c.model.vocab_size = 256
  with pytest.raises(DataError, match='model.vocab_size=256'):
    train_and_evaluate(schema.load(c, jax.device_count()), str(tmp_path / 'fresh'))
  assert not os.path.exists(tmp_path / 'fresh' / 'config.json')
