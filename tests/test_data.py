"""Data path: tokenizer, default corpus cache, grain train pipeline (sharding, resume), eval batches."""

import dataclasses
import json
import os

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from configs.schema import DataConfig
from data import corpus, pipeline, sources
from data.tokenizer import ByteTokenizer, get_tokenizer

L = 16  # window length of the synthetic tests
TOKENS = np.arange(64 * L + 1, dtype=np.uint16)  # 64 windows; window i starts with token i*L


def window_ids(batch):
  return [int(x) // L for x in batch['inputs'][:, 0]]


def take(it, n):
  return [next(it) for _ in range(n)]


def make(seed=0, process_index=0, process_count=1, batch=8, **kw):
  return pipeline.train_dataset(
    TOKENS,
    DataConfig(seed=seed, **kw),
    seq_len=L,
    global_batch_size=batch,
    process_index=process_index,
    process_count=process_count,
  )


@pytest.fixture(scope='session')
def stdlib_cfg(tmp_path_factory):
  return DataConfig(cache_dir=str(tmp_path_factory.mktemp('cache')), heldout_fraction=0.05)


@pytest.fixture(scope='session')
def stdlib_dir(stdlib_cfg):
  return corpus.prepare_default_corpus(stdlib_cfg)


def test_tokenizer_round_trip():
  tok = get_tokenizer('byte')
  text = 'plain ASCII, héllo wörld, 日本語, 🚀\n'
  ids = tok.encode(text, add_eos=True)
  assert ids.dtype == np.uint16 and ids[-1] == tok.eos_id and tok.vocab_size == 257
  assert tok.decode(ids) == text
  assert tok.decode(tok.encode(text.encode('utf-8'))) == text
  assert list(tok.encode(b'\x00\xff')) == [0, 255]
  assert tok.decode(np.array([0xFF, 65])) == '\ufffdA'  # invalid UTF-8 is replaced, not raised
  assert tok.num_bytes(ids) == len(text.encode('utf-8'))
  np.testing.assert_array_equal(tok.bytes_per_token(np.array([1, 256, 7])), [1, 0, 1])
  assert tok.bytes_per_token(jax.numpy.array([256, 3])).sum() == 1
  assert tok.fingerprint == ByteTokenizer().fingerprint == 'byte-v1'
  with pytest.raises(corpus.DataError, match='unknown tokenizer'):
    get_tokenizer('sentencepiece')
  with pytest.raises(ValueError, match='vocab_size'):
    tok.decode([300])


def test_window_source():
  src = pipeline.WindowSource(TOKENS, L)
  assert len(src) == 64 and len(pipeline.WindowSource(TOKENS[:-1], L)) == 63
  w = src[5]
  assert w.dtype == np.int32 and w.shape == (L + 1,)
  ex = pipeline.split_window(w)
  assert ex['inputs'].shape == ex['targets'].shape == (L,)
  np.testing.assert_array_equal(ex['inputs'][1:], ex['targets'][:-1])
  np.testing.assert_array_equal(ex['inputs'], np.arange(5 * L, 6 * L))
  with pytest.raises(IndexError):
    src[64]


def test_heldout_split_is_deterministic_and_roughly_sized():
  _, files = corpus.stdlib_files()
  held = [f for f in files if corpus.is_heldout(f, 0.1)]
  assert held == [f for f in files if corpus.is_heldout(f, 0.1)]
  assert 0.07 < len(held) / len(files) < 0.13
  assert set(held) <= {f for f in files if corpus.is_heldout(f, 0.2)}  # nested in the fraction
  assert not any('site-packages' in f for f in files)


def test_default_corpus(stdlib_dir, stdlib_cfg):
  meta = corpus.load_metadata(stdlib_dir)
  _, files = corpus.stdlib_files()
  held = sum(corpus.is_heldout(f, 0.05) for f in files)
  docs = meta['documents']
  assert docs['train'] + docs['heldout'] + sum(meta['skipped'].values()) == len(files)
  assert 0 < docs['heldout'] <= held and meta['files'] == len(files)
  tok = ByteTokenizer()
  for split in corpus.SPLITS:
    arr = corpus.load_split(stdlib_dir, split)
    offsets = sources.open_split(stdlib_dir, split).offsets
    assert arr.dtype == np.uint16 and meta['dtype'] == 'uint16'
    assert arr.size == meta['tokens'][split] == offsets[-1] and arr[-1] == tok.eos_id
    assert int((arr == tok.eos_id).sum()) == docs[split] == len(offsets) - 1  # one EOS per document
    assert (arr[offsets[1:] - 1] == tok.eos_id).all()
  assert meta['tokenizer']['fingerprint'] == 'byte-v1' and meta['split']['heldout_fraction'] == 0.05
  assert corpus.resolve_dataset(stdlib_cfg) == stdlib_dir
  assert corpus.resolve_dataset(dataclasses.replace(stdlib_cfg, path=stdlib_dir)) == stdlib_dir
  with pytest.raises(corpus.DataError, match='data.path'):
    corpus.resolve_dataset(dataclasses.replace(stdlib_cfg, path=os.path.dirname(stdlib_dir)))


def test_corpus_cache_is_reused_and_incomplete_dirs_rebuilt(stdlib_dir, stdlib_cfg):
  files = [
    os.path.join(stdlib_dir, n)
    for n in ('train/offsets.npy', 'heldout/offsets.npy', 'metadata.json')
  ]
  before = [os.stat(f).st_mtime_ns for f in files]
  assert corpus.prepare_default_corpus(stdlib_cfg) == stdlib_dir
  assert [os.stat(f).st_mtime_ns for f in files] == before
  meta = corpus.load_metadata(stdlib_dir)
  os.remove(files[2])  # as if a preparer died before finishing: must not count as complete
  with open(files[0], 'wb') as fh:
    fh.write(b'garbage')
  assert corpus.prepare_default_corpus(stdlib_cfg) == stdlib_dir
  assert corpus.load_metadata(stdlib_dir) == meta
  assert corpus.load_split(stdlib_dir, 'train').size == meta['tokens']['train']
  assert sorted(os.listdir(os.path.dirname(stdlib_dir))) == [os.path.basename(stdlib_dir)]


def test_train_pipeline_deterministic_per_seed():
  a, b, c = (take(iter(make(seed=s)), 16) for s in (0, 0, 1))
  assert all(x['inputs'].shape == (8, L) and x['inputs'].dtype == np.int32 for x in a)
  for x, y in zip(a, b):
    np.testing.assert_array_equal(x['inputs'], y['inputs'])
    np.testing.assert_array_equal(x['targets'], y['targets'])
  np.testing.assert_array_equal(a[0]['inputs'][:, 1:], a[0]['targets'][:, :-1])
  assert [window_ids(x) for x in a] != [window_ids(x) for x in c]
  epoch1, epoch2 = sum(map(window_ids, a[:8]), []), sum(map(window_ids, a[8:]), [])
  assert sorted(epoch1) == list(range(64)) and epoch1 != list(range(64))
  assert sorted(epoch2) == list(range(64)) and epoch2 != epoch1  # each epoch reshuffled


def test_process_shards_are_disjoint_and_cover_the_single_process_stream():
  single = sum(map(window_ids, take(iter(make()), 8)), [])  # one epoch: 8 x 8 windows
  shards = [
    sum(map(window_ids, take(iter(make(process_index=p, process_count=2)), 8)), []) for p in (0, 1)
  ]
  assert all(len(s) == 32 for s in shards) and not set(shards[0]) & set(shards[1])
  assert sorted(shards[0] + shards[1]) == sorted(single) == list(range(64))
  assert shards[0] == single[0::2] and shards[1] == single[1::2]


def test_resume_from_iterator_state():
  it = iter(make())
  take(it, 5)
  state = it.get_state()
  expected = take(it, 7)
  fresh = iter(make())
  fresh.set_state(json.loads(json.dumps(state)))  # state must survive JSON
  for x, y in zip(take(fresh, 7), expected):
    np.testing.assert_array_equal(x['inputs'], y['inputs'])


def test_resume_through_orbax(tmp_path):
  it = iter(make(seed=3))
  take(it, 3)
  with ocp.CheckpointManager(tmp_path / 'ckpt') as mngr:
    mngr.save(3, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(it)))
    mngr.wait_until_finished()
  expected = take(it, 4)
  fresh = iter(make(seed=3))
  with ocp.CheckpointManager(tmp_path / 'ckpt') as mngr:
    assert mngr.latest_step() == 3
    mngr.restore(3, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(fresh)))
  for x, y in zip(take(fresh, 4), expected):
    np.testing.assert_array_equal(x['inputs'], y['inputs'])


def test_train_pipeline_rejects_bad_arguments():
  with pytest.raises(ValueError, match='process_count'):
    make(batch=7, process_count=2)
  with pytest.raises(corpus.DataError, match='seq_len'):
    pipeline.train_dataset(TOKENS[:L], DataConfig(), seq_len=L, global_batch_size=2)


def test_eval_batches():
  run = lambda **kw: list(pipeline.eval_batches(TOKENS, seq_len=L, batch_size=6, **kw))
  full = run(max_batches=0)
  assert len(full) == 10  # 64 windows -> 10 full batches of 6; the partial one is dropped
  assert [window_ids(b) for b in full[:2]] == [list(range(6)), list(range(6, 12))]
  np.testing.assert_array_equal(full[0]['inputs'][:, 1:], full[0]['targets'][:, :-1])
  again = run(max_batches=3)
  assert len(again) == 3
  for x, y in zip(again, full):
    np.testing.assert_array_equal(x['inputs'], y['inputs'])
  halves = [run(max_batches=2, process_index=p, process_count=2) for p in (0, 1)]
  assert window_ids(halves[0][1]) + window_ids(halves[1][1]) == list(range(6, 12))


def test_make_global_batch():
  mesh = jax.make_mesh((8,), ('data',), axis_types=(jax.sharding.AxisType.Auto,))
  sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec('data'))
  local = next(iter(make()))
  out = pipeline.make_global_batch(local, sharding)
  assert set(out) == {'inputs', 'targets'} and out['inputs'].sharding == sharding
  np.testing.assert_array_equal(np.asarray(out['targets']), local['targets'])


@pytest.mark.slow
def test_worker_processes_give_the_same_batches_and_resume():
  from absl import flags

  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()  # grain workers read absl flags (docs/design.md §8)
  expected = take(iter(make()), 6)
  it = iter(make(worker_count=2, prefetch=2))
  got = take(it, 3)
  state = it.get_state()
  it.close()
  fresh = iter(make(worker_count=2, prefetch=2))
  fresh.set_state(state)
  got += take(fresh, 3)
  fresh.close()
  for x, y in zip(got, expected):
    np.testing.assert_array_equal(x['inputs'], y['inputs'])


# --- prepare under bad input (one line, nothing written) ---


def _prepare(pattern, out, **kw):
  from data import prepare

  return prepare.prepare_dataset(str(pattern), str(out), processes=1, **kw)


def _fails(pattern, out, match, **kw):
  with pytest.raises(corpus.DataError, match=match) as e:
    _prepare(pattern, out, **kw)
  assert '\n' not in str(e.value) and not os.path.exists(out)  # nothing left behind
  return str(e.value)


def test_prepare_repairs_lone_surrogates(tmp_path):
  (tmp_path / 'a.jsonl').write_text('{"text": "ab\\udc92cd"}\n{"text": "ok \\ud83d\\ude80"}\n')
  meta = _prepare(tmp_path / 'a.jsonl', tmp_path / 'out')
  assert meta['repaired'] == {'lone_surrogate': 1} and sum(meta['skipped'].values()) == 0
  docs = sum(meta['documents'].values())
  assert docs == 2 and meta['text_bytes']['train'] + meta['text_bytes']['heldout'] == len(
    'ab\ufffdcd'.encode()
  ) + len('ok \U0001f680'.encode())


def test_prepare_skips_unreadable_files(tmp_path, monkeypatch):
  from data import inputs

  (tmp_path / 'in').mkdir()
  for name in ('a.txt', 'b.txt', 'c.txt'):
    (tmp_path / 'in' / name).write_text(f'text of {name}')
  (tmp_path / 'in' / 'd.txt').mkdir()  # a directory matched by the glob
  real_open = open

  def denying_open(path, *a, **kw):
    if str(path).endswith('b.txt'):
      raise PermissionError(13, 'Permission denied', str(path))
    return real_open(path, *a, **kw)

  monkeypatch.setattr(inputs, 'open', denying_open, raising=False)
  meta = _prepare(tmp_path / 'in' / '*.txt', tmp_path / 'out')
  assert meta['skipped_files'] == {'permission_denied': ['b.txt']}
  assert sum(meta['documents'].values()) == 2 and meta['files'] == 3
  monkeypatch.setattr(
    inputs,
    'open',
    lambda p, *a, **kw: denying_open('b.txt' if str(p).endswith('.txt') else p, *a, **kw),
    raising=False,
  )  # every input denied
  _fails(tmp_path / 'in' / '*.txt', tmp_path / 'out2', 'none of the 3 files.*permission_denied')
  _fails(tmp_path / 'in' / 'd.txt', tmp_path / 'out3', 'only directories')


def test_prepare_absent_field_and_mostly_skipped(tmp_path):
  (tmp_path / 'a.jsonl').write_text('{"body": "x"}\n{"body": "y"}\n')
  assert "'text'" in _fails(tmp_path / 'a.jsonl', tmp_path / 'out', 'absent')
  (tmp_path / 'b.jsonl').write_text('{"text": "good"}\n' + 'not json\n' * 9)
  _fails(tmp_path / 'b.jsonl', tmp_path / 'out', r'9 of the 10 records.*bad_json 9.*more than 80%')
  assert (
    sum(_prepare(tmp_path / 'a.jsonl', tmp_path / 'ok', field='body')['documents'].values()) == 2
  )


def test_prepare_output_that_is_a_file(tmp_path):
  (tmp_path / 'a.txt').write_text('text')
  (tmp_path / 'out').write_text('not a directory')
  with pytest.raises(corpus.DataError, match='existing file') as e:
    _prepare(tmp_path / 'a.txt', tmp_path / 'out')
  assert '\n' not in str(e.value) and (tmp_path / 'out').read_text() == 'not a directory'
  (tmp_path / 'dir').mkdir()
  (tmp_path / 'dir' / '.work').write_text('a file where the work directory goes')
  with pytest.raises(corpus.DataError, match='cannot create'):
    _prepare(tmp_path / 'a.txt', tmp_path / 'dir')


def _split_docs(out):
  tok = ByteTokenizer()
  result = {}
  for split in corpus.SPLITS:
    s = sources.open_split(str(out), split)
    arr = corpus.load_split(str(out), split)
    result[split] = sorted(
      tok.decode(arr[a : b - 1]) for a, b in zip(s.offsets[:-1], s.offsets[1:])
    )
  return result


@pytest.mark.parametrize('n', [2, 30])
def test_prepare_heldout_never_empty_and_path_independent(tmp_path, n):
  splits = []
  for where in ('one/place', 'another/deeper/place'):
    d = tmp_path / where
    d.mkdir(parents=True)
    for i in range(n):
      (d / f'doc{i:02d}.txt').write_text(f'document {i} ' * 50)
    meta = _prepare(
      d / '*.txt', tmp_path / f'out-{where.replace("/", "-")}', heldout_fraction=0.001
    )
    assert meta['documents']['heldout'] == 1 and meta['documents']['train'] == n - 1
    assert meta['split']['forced'] and meta['text_bytes']['heldout'] == len('document 0 ' * 50)
    splits.append(_split_docs(tmp_path / f'out-{where.replace("/", "-")}'))
  assert splits[0] == splits[1] and len(splits[0]['heldout']) == 1


def test_prepare_cli_failed_write_is_one_line_and_resumable(tmp_path, monkeypatch, capsys):
  """ENOSPC while writing the split arrays: one line, exit 1, finished pieces kept; a rerun
  after space is freed resumes and completes."""
  import errno  # pylint: disable=g-import-not-at-top

  from data import prepare  # pylint: disable=g-import-not-at-top

  (tmp_path / 'in').mkdir()
  for i in range(4):
    (tmp_path / 'in' / f'{i}.txt').write_text(f'document number {i} ' * 20)
  from data import storage  # pylint: disable=g-import-not-at-top

  out, write = tmp_path / 'out', storage.write_bytes

  def full_disk(location, data):  # the disk fills up when the split arrays are written
    if location.endswith('offsets.npy'):
      raise OSError(errno.ENOSPC, 'No space left on device', location)
    write(location, data)

  monkeypatch.setattr(storage, 'write_bytes', full_disk)
  with pytest.raises(SystemExit) as exited:
    prepare.prepare_or_exit(str(tmp_path / 'in' / '*.txt'), str(out))
  err = capsys.readouterr().err
  assert exited.value.code == 1 and err.count('\n') == 1
  assert err.startswith(f'error: cannot write {out}/') and 'offsets' in err.split(':')[1], err
  assert 'No space left on device' in err
  assert 'rerun the same command to resume' in err and list((out / '.work').glob('piece-*.npz'))
  monkeypatch.setattr(storage, 'write_bytes', write)
  meta = prepare.prepare_or_exit(str(tmp_path / 'in' / '*.txt'), str(out))
  assert sum(meta['documents'].values()) == 4 and not (out / '.work').exists()
