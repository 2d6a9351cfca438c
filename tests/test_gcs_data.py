"""A prepared dataset on Cloud Storage (a local fake-gcs-server, tests/gcs.py): `data.prepare`
writes it, `data.verify` checks it, the pipeline reads it, exactly as on local disk; the inputs
stay local."""

import json
import pickle
import subprocess
import sys

import numpy as np
import pytest

from configs.schema import DataConfig
from data import corpus, pieces, pipeline, prepare, sources, storage
from data.errors import DataError
from data.tokenizer import get_tokenizer
from tests.tokenizer_files import write_bpe_tokenizer

DOCS = [
  f'document {i}: ' + 'the quick brown fox jumps over the lazy dog. ' * (3 + i) for i in range(12)
]


@pytest.fixture
def inputs(tmp_path):
  """A glob over DOCS, one small text file each."""
  (tmp_path / 'in').mkdir()
  for i, doc in enumerate(DOCS):
    (tmp_path / 'in' / f'{i:02d}.txt').write_text(doc)
  return str(tmp_path / 'in' / '*.txt')


def _prepare(pattern, output, **kwargs):
  return prepare.prepare_dataset(pattern, output, **{'heldout_fraction': 0.3, **kwargs})


def _resolve(path, mode):
  corpus._VERIFIED.clear()  # pylint: disable=protected-access  (a fresh process each time)
  return corpus.resolve_dataset(DataConfig(path=path, verify=mode))


def test_a_dataset_prepared_on_gcs_equals_the_local_one(tmp_path, bucket, inputs):
  local, remote = str(tmp_path / 'ds'), bucket + '/ds'
  want, got = _prepare(inputs, local), _prepare(inputs, remote)
  assert got['fingerprint'] == want['fingerprint'] and got['checksums'] == want['checksums']
  assert got['documents'] == want['documents'] and got['documents']['heldout'] > 0
  for split in prepare.SPLITS:
    a, b = sources.open_split(local, split), sources.open_split(remote, split)
    np.testing.assert_array_equal(a.offsets, b.offsets)
    np.testing.assert_array_equal(a.tokens[:], b.tokens[:])
    assert b.tokens.path == f'{remote}/{split}/tokens'
  assert storage.walk_files(remote) == sorted([*got['checksums'], 'metadata.json'])  # no .work
  assert corpus.load_metadata(remote) == got
  assert _prepare(inputs, remote) == got  # prepared already: its metadata, nothing redone
  with pytest.raises(DataError, match='already holds a different prepared dataset'):
    _prepare(inputs, remote, tokenizer='byte', heldout_fraction=0.5)
  tokens = sources.open_split(remote, 'train').tokens
  copy = pickle.loads(pickle.dumps(tokens))  # as grain sends it to a worker: the URL only
  assert copy.path == tokens.path and len(pickle.dumps(tokens)) < 200
  np.testing.assert_array_equal(copy.read_many([3], [40])[0], tokens[3:40])


def test_verify_on_gcs_passes_and_names_a_damaged_or_missing_object(bucket, inputs):
  remote = bucket + '/ds'
  _prepare(inputs, remote)
  for mode in ('full', 'sizes', 'auto'):
    assert _resolve(remote, mode) == remote
  shard = f'{remote}/train/tokens/c/0'
  good = storage.read_bytes(shard)
  storage.write_bytes(shard, good[:-1])
  with pytest.raises(DataError, match=f'{shard} has {len(good) - 1} bytes, {len(good)} were') as e:
    _resolve(remote, 'sizes')
  assert '\n' not in str(e.value)
  altered = bytearray(good)
  altered[100] ^= 0x40  # inside the first inner chunk: same size, other content
  storage.write_bytes(shard, bytes(altered))
  with pytest.raises(DataError, match=f'{shard} does not match its recorded sha256') as e:
    _resolve(remote, 'full')
  assert '\n' not in str(e.value)
  assert _resolve(remote, 'sizes') == remote  # sizes cannot see it; the read's crc32c does
  with pytest.raises(DataError, match='cannot read tokens.*re-run python -m data.prepare') as e:
    sources.open_split(remote, 'train').tokens.read_many([0], [10])
  assert '\n' not in str(e.value)
  storage.remove(shard)
  with pytest.raises(DataError, match=f'{shard} is missing') as e:
    _resolve(remote, 'sizes')
  assert '\n' not in str(e.value)
  storage.remove(f'{remote}/heldout/offsets.npy')
  with pytest.raises(DataError, match='missing heldout/offsets.npy') as e:
    _resolve(remote, 'off')
  assert '\n' not in str(e.value)


def test_the_first_batches_from_gcs_equal_the_local_ones(tmp_path, bucket, inputs):
  local, remote = str(tmp_path / 'ds'), bucket + '/ds'
  _prepare(inputs, local)
  _prepare(inputs, remote)
  assert _resolve(remote, 'auto') == remote
  for packing in (False, True):
    cfg = DataConfig(packing=packing, seed=3)
    a, b = (
      next(
        iter(
          pipeline.train_dataset(
            sources.open_split(d, 'train'), cfg, seq_len=16, global_batch_size=4
          )
        )
      )
      for d in (local, remote)
    )
    assert a.keys() == b.keys()
    for key in a:
      np.testing.assert_array_equal(a[key], b[key])
  np.testing.assert_array_equal(
    corpus.load_split(local, 'heldout'), corpus.load_split(remote, 'heldout')
  )
  assert corpus.dataset_tokenizer(remote).fingerprint == corpus.dataset_tokenizer(local).fingerprint


def test_an_interrupted_prepare_on_gcs_resumes_from_its_pieces(
  tmp_path, bucket, inputs, monkeypatch
):
  monkeypatch.setattr(pieces, 'GROUP_FILES', 1)  # one piece per file: many pieces to resume
  straight = _prepare(inputs, str(tmp_path / 'straight'))
  real, calls = pieces.tokenize_file, []

  def dies_on_the_fifth(task, path, rel):
    calls.append(rel)
    if len(calls) == 5:
      raise KeyboardInterrupt  # as if the run were interrupted
    return real(task, path, rel)

  remote = bucket + '/ds'
  monkeypatch.setattr(pieces, 'tokenize_file', dies_on_the_fifth)
  with pytest.raises(KeyboardInterrupt):
    _prepare(inputs, remote)
  assert len([f for f in storage.listdir(f'{remote}/.work') if f.startswith('piece-')]) == 4
  with pytest.raises(DataError, match='metadata.json'):
    sources.open_split(remote, 'train')  # nothing half-written looks complete
  with pytest.raises(DataError, match='interrupted preparation'):
    _prepare(inputs, remote, heldout_fraction=0.5)
  calls.clear()
  monkeypatch.setattr(pieces, 'tokenize_file', lambda t, p, r: calls.append(r) or real(t, p, r))
  assert _prepare(inputs, remote)['fingerprint'] == straight['fingerprint']
  assert len(calls) == len(DOCS) - 4  # the 4 finished files were not tokenized again
  assert not storage.exists(f'{remote}/.work')


def test_the_default_corpus_cache_on_gcs(tmp_path, bucket, monkeypatch):
  root, files = corpus.stdlib_files()
  monkeypatch.setattr(corpus, 'stdlib_files', lambda: (root, files[:12]))  # a small corpus
  local = corpus.prepare_default_corpus(DataConfig(cache_dir=str(tmp_path), heldout_fraction=0.3))
  cfg = DataConfig(cache_dir=bucket + '/cache', heldout_fraction=0.3)
  remote = corpus.prepare_default_corpus(cfg)
  assert remote == f'{bucket}/cache/{storage.basename(local)}'
  assert storage.listdir(f'{bucket}/cache') == [storage.basename(local)]  # no temporary left
  assert corpus.load_metadata(remote) == corpus.load_metadata(local)
  assert corpus.prepare_default_corpus(cfg) == remote  # cached
  assert storage.listdir(str(tmp_path)) == [storage.basename(local)]
  corpus._VERIFIED.clear()  # pylint: disable=protected-access
  assert corpus.resolve_dataset(cfg) == remote  # data.path unset: the default corpus, verified


def test_a_tokenizer_file_on_gcs(tmp_path, bucket, inputs):
  local = write_bpe_tokenizer(DOCS, str(tmp_path / 'tokenizer.json'))
  storage.write_bytes(f'{bucket}/tok/tokenizer.json', storage.read_bytes(local))
  a, b = get_tokenizer(f'hf:{local}'), get_tokenizer(f'hf:{bucket}/tok/tokenizer.json')
  assert a.fingerprint == b.fingerprint and a.vocab_size == b.vocab_size
  np.testing.assert_array_equal(a.encode(DOCS[3], add_eos=True), b.encode(DOCS[3], add_eos=True))
  meta = _prepare(inputs, bucket + '/ds', tokenizer=b.spec)
  assert meta['tokenizer']['fingerprint'] == a.fingerprint
  assert corpus.dataset_tokenizer(bucket + '/ds').fingerprint == a.fingerprint
  with pytest.raises(DataError, match='cannot read the file') as e:
    get_tokenizer(f'hf:{bucket}/tok/missing.json')
  assert '\n' not in str(e.value)


def test_kvstore_specs_of_local_gcs_and_s3_locations(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  assert storage.kvstore('rel/tokens') == {
    'driver': 'file',
    'path': str(tmp_path / 'rel' / 'tokens'),
  }
  assert storage.kvstore(f'file://{tmp_path}/x') == {'driver': 'file', 'path': f'{tmp_path}/x'}
  assert storage.kvstore('gs://runs/ds/train/tokens/') == {
    'driver': 'gcs',
    'bucket': 'runs',
    'path': 'ds/train/tokens',
  }
  assert storage.kvstore('s3://runs/ds/train/tokens') == {
    'driver': 's3',
    'bucket': 'runs',
    'path': 'ds/train/tokens',
  }
  assert sources.token_spec('gs://runs/ds/train/tokens') == {
    'driver': 'zarr3',
    'kvstore': {'driver': 'gcs', 'bucket': 'runs', 'path': 'ds/train/tokens'},
  }


@pytest.mark.parametrize('pattern', ['gs://corpus/in/*.txt', 's3://corpus/in/*.jsonl'])
def test_an_input_pattern_on_object_storage_is_refused_in_one_line(tmp_path, capsys, pattern):
  with pytest.raises(DataError, match='inputs must be local files') as e:
    prepare.prepare_dataset(pattern, str(tmp_path / 'ds'))
  assert '\n' not in str(e.value) and pattern in str(e.value)
  with pytest.raises(SystemExit) as e:
    prepare.prepare_or_exit(pattern, str(tmp_path / 'ds'))
  assert e.value.code == 1
  err = capsys.readouterr().err
  assert err.startswith('error: ') and err.count('\n') == 1 and 'inputs must be local' in err
  assert not (tmp_path / 'ds').exists()


def test_an_output_in_a_missing_bucket_is_refused_in_one_line(bucket, inputs):
  missing = f'{bucket}-missing/ds'
  with pytest.raises(DataError, match='does not exist') as e:
    _prepare(inputs, missing)
  assert '\n' not in str(e.value) and missing in str(e.value)


def test_the_prepare_command_and_worker_processes_write_to_gcs(
  tmp_path, bucket, inputs, monkeypatch
):
  """`python -m data.prepare --output=gs://...`, and 2 spawned tokenizer workers each writing its
  pieces to the bucket: the same dataset as a local serial prepare."""
  local = _prepare(inputs, str(tmp_path / 'ds'))
  command = [sys.executable, '-m', 'data.prepare', f'--input={inputs}', f'--output={bucket}/cli']
  proc = subprocess.run(
    [*command, '--heldout_fraction=0.3'], capture_output=True, text=True, timeout=120
  )
  assert proc.returncode == 0, proc.stderr
  assert json.loads(proc.stdout.splitlines()[-1])['tokens'] == local['tokens']
  assert corpus.load_metadata(f'{bucket}/cli')['fingerprint'] == local['fingerprint']
  monkeypatch.setattr(pieces, 'GROUP_FILES', 3)  # 4 pieces for 2 workers
  workers = _prepare(inputs, f'{bucket}/workers', processes=2)
  assert workers['checksums'] == local['checksums']  # the same files, byte for byte
