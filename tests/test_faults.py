"""Faults a run must survive without training on damaged data or losing work: a damaged token store
(deleted, truncated or altered shard file; checked before training and on every read), an
oversized model (refused before compiling). Training faults (non-finite updates, a damaged
checkpoint, a full disk, signals, a second trainer) are tested in test_train.py beside the run
they interrupt; prepare's bad input in test_data.py."""

import os

import jax
import numpy as np
import pytest

from configs import schema, tiny
from data import corpus, pipeline, prepare, sources, verify
from data.errors import DataError
from train import train as train_lib
from train.train import train_and_evaluate

DOCS = [f'document {i}: ' + 'the quick brown fox jumps over the lazy dog. ' * (40 + i)
        for i in range(30)]


@pytest.fixture
def prepared(tmp_path):
  """A fresh small prepared dataset (one shard file per split) that a test may damage."""
  (tmp_path / 'in').mkdir()
  for i, doc in enumerate(DOCS):
    (tmp_path / 'in' / f'{i:02d}.txt').write_text(doc)
  out = tmp_path / 'data'
  prepare.prepare_dataset(str(tmp_path / 'in' / '*.txt'), str(out), processes=1)
  return str(out)


def _resolve(path, mode):
  corpus._VERIFIED.clear()  # pylint: disable=protected-access  (a fresh process each time)
  return corpus.resolve_dataset(schema.DataConfig(path=path, verify=mode))


def _shard(prepared):
  return os.path.join(prepared, 'train', 'tokens', 'c', '0')


def _flip_byte(path, at):
  with open(path, 'r+b') as fh:
    fh.seek(at)
    byte = fh.read(1)
    fh.seek(at)
    fh.write(bytes([byte[0] ^ 0x40]))


def test_prepare_records_every_file_and_an_intact_store_passes(prepared):
  meta = corpus.load_metadata(prepared)
  assert meta['format_version'] == 2
  assert set(meta['checksums']) == {'train/offsets.npy', 'train/tokens/zarr.json', 'train/tokens/c/0',
                                'heldout/offsets.npy', 'heldout/tokens/zarr.json',
                                'heldout/tokens/c/0'}
  for mode, ran in (('auto', 'full'), ('full', 'full'), ('sizes', 'sizes'), ('off', 'off')):
    assert verify.check(prepared, meta, mode) == ran
  assert _resolve(prepared, 'auto') == prepared


@pytest.mark.parametrize('mode', ['full', 'sizes'])
def test_a_deleted_or_truncated_shard_is_refused_before_training(prepared, mode):
  shard = _shard(prepared)
  size = os.path.getsize(shard)
  with open(shard, 'r+b') as fh:
    fh.truncate(size - 1)
  with pytest.raises(DataError, match=f'{shard} has {size - 1} bytes, {size} were prepared') as e:
    _resolve(prepared, mode)
  assert '\n' not in str(e.value) and 're-run python -m data.prepare' in str(e.value)
  os.remove(shard)
  with pytest.raises(DataError, match=f'{shard} is missing'):
    _resolve(prepared, mode)


def test_an_altered_byte_is_refused_by_full_and_by_every_read(prepared):
  shard = _shard(prepared)
  _flip_byte(shard, 100)  # inside the first inner chunk: same size, other content
  with pytest.raises(DataError, match=f'{shard} does not match its recorded sha256'):
    _resolve(prepared, 'full')
  assert _resolve(prepared, 'sizes') == prepared  # sizes cannot see it; the read's crc32c does
  split = sources.open_split(prepared, 'train')
  with pytest.raises(DataError, match=f'cannot read tokens.*{shard}.*re-run python -m data.prepare'):
    split.tokens.read_many([0], [10])
  assert split.tokens[5000:5010].shape == (10,)  # other chunks still read


def test_a_missing_chunk_is_never_read_as_zeros(prepared):
  os.remove(_shard(prepared))
  _resolve(prepared, 'off')  # no file check: the read itself must refuse
  batches = pipeline.train_dataset(sources.open_split(prepared, 'train'), seq_len=16,
                                   global_batch_size=2, seed=0, process_index=0, process_count=1)
  with pytest.raises(DataError, match='cannot read tokens.*missing'):
    next(iter(batches))


def test_training_on_a_damaged_store_stops_in_one_line_before_compiling(prepared, tmp_path,
                                                                         monkeypatch):
  _flip_byte(_shard(prepared), 200)
  corpus._VERIFIED.clear()  # pylint: disable=protected-access
  c = tiny.get_config()
  c.data.path = prepared
  cfg = schema.load(c, jax.device_count())
  monkeypatch.setattr(train_lib, 'make_step_fns', lambda *a, **k: pytest.fail('compiled'))
  with pytest.raises(DataError, match='does not match its recorded sha256'):
    train_and_evaluate(cfg, str(tmp_path / 'run'))
  assert not os.path.exists(tmp_path / 'run' / 'checkpoints')


def test_a_dataset_without_checksums_is_still_read(prepared):
  meta = corpus.load_metadata(prepared)
  del meta['checksums']  # as prepared before checksums were recorded
  assert verify.check(prepared, meta, 'full') == 'off'
  tokens = corpus.load_split(prepared, 'train')
  assert tokens.dtype == np.uint16 and len(tokens) > 1000
