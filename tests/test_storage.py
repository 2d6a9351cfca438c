"""The storage layer (data/storage.py) behaves the same on a local disk and on a bucket."""

import pytest

from data import storage


@pytest.fixture(params=['local', 'gs'])
def root(request, tmp_path):
  if request.param == 'local':
    return str(tmp_path / 'root')
  return storage.join(request.getfixturevalue('bucket'), 'root')


def test_locations_resolve_to_one_canonical_form(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  assert storage.resolve('runs/a') == str(tmp_path / 'runs' / 'a')
  assert storage.resolve(f'file://{tmp_path}/x') == str(tmp_path / 'x')
  assert storage.resolve('gs://bucket/a/b/') == 'gs://bucket/a/b'
  assert storage.resolve('GS://bucket') == 'gs://bucket'
  assert storage.join('gs://b/run', 'checkpoints', '4') == 'gs://b/run/checkpoints/4'
  assert storage.parent('gs://b/run/x.json') == 'gs://b/run'
  assert storage.bucket_and_key('gs://b/run/x.json') == ('b', 'run/x.json')
  with pytest.raises(storage.StorageError, match=r"^hdfs://n/x: unknown URL scheme 'hdfs://'"):
    storage.resolve('hdfs://n/x')
  with pytest.raises(storage.StorageError, match=r'^gs:///x: no bucket name'):
    storage.resolve('gs:///x')


def test_tensorstore_specs_follow_the_url(tmp_path):
  assert storage.kvstore(str(tmp_path / 't')) == {'driver': 'file', 'path': str(tmp_path / 't')}
  assert storage.kvstore('gs://b/ds/train/tokens') == {
    'driver': 'gcs',
    'bucket': 'b',
    'path': 'ds/train/tokens',
  }
  assert storage.kvstore('s3://b/ds/tokens') == {'driver': 's3', 'bucket': 'b', 'path': 'ds/tokens'}


def test_files_read_back_list_and_move(root):
  storage.write_json(storage.join(root, 'a.json'), {'x': 1})
  storage.write_text(storage.join(root, 'd', 'e', 'f.txt'), 'text')
  storage.write_bytes(storage.join(root, 'd', 'g.bin'), b'\0\1')
  assert storage.read_json(storage.join(root, 'a.json')) == {'x': 1}
  assert storage.listdir(root) == ['a.json', 'd']
  assert storage.isdir(storage.join(root, 'd')) and not storage.isdir(storage.join(root, 'a.json'))
  assert storage.isfile(storage.join(root, 'a.json')) and not storage.isfile(
    storage.join(root, 'd')
  )
  assert storage.walk_files(root) == ['a.json', 'd/e/f.txt', 'd/g.bin']
  assert storage.getsize(storage.join(root, 'd', 'g.bin')) == 2
  storage.move(storage.join(root, 'd'), storage.join(root, 'moved'))
  assert storage.walk_files(root) == ['a.json', 'moved/e/f.txt', 'moved/g.bin']
  storage.rmtree(storage.join(root, 'moved'))
  storage.remove(storage.join(root, 'a.json'))
  assert storage.walk_files(root) == [] and storage.listdir(storage.join(root, 'nothing')) == []


def test_writes_replace_whole_files_and_leave_no_temporaries(root):
  target = storage.join(root, 'config.json')
  storage.write_text(target, 'first, and longer')
  storage.write_text(target, 'second')
  assert storage.read_text(target) == 'second'
  assert storage.listdir(root) == ['config.json']


def test_exclusive_creation_happens_once(root):
  lock = storage.join(root, 'train.lock')
  assert storage.create_exclusive(lock, b'one')
  assert not storage.create_exclusive(lock, b'two')
  assert storage.read_text(lock) == 'one'
  storage.remove(lock)
  assert storage.create_exclusive(lock, b'three')


def test_an_append_log_keeps_every_line(root):
  location = storage.join(root, 'metrics.jsonl')
  log = storage.AppendLog(location)
  log.write('1\n')
  log.flush()
  assert storage.read_text(location) == '1\n'  # readable after every flush
  log.write('2\n')
  log.close()
  log = storage.AppendLog(location)  # a resumed run appends
  log.write('3\n')
  log.close()
  assert storage.read_text(location) == '1\n2\n3\n'


def test_probe_writes_nothing_it_leaves_behind(root):
  storage.probe(root)
  assert storage.listdir(root) == []


def test_probe_names_the_location_of_what_fails(bucket, tmp_path):
  with pytest.raises(storage.StorageError, match=r"^gs://absent-bucket/r: bucket 'absent-bucket'"):
    storage.probe('gs://absent-bucket/r')
  (tmp_path / 'file').write_text('a file, not a directory')  # unwritable even for root
  with pytest.raises(storage.StorageError, match=rf'^{tmp_path}/file/run: cannot write there'):
    storage.probe(str(tmp_path / 'file' / 'run'))


def test_missing_credentials_are_named(monkeypatch):
  for key in ('STORAGE_EMULATOR_HOST', 'GOOGLE_APPLICATION_CREDENTIALS'):
    monkeypatch.delenv(key, raising=False)
  monkeypatch.setenv('HOME', '/nonexistent')  # no gcloud application-default credentials
  monkeypatch.setenv('GCE_METADATA_HOST', '127.0.0.1:1')  # and no metadata server to ask
  monkeypatch.setenv('GCE_METADATA_IP', '127.0.0.1:1')
  with pytest.raises(storage.StorageError, match=r'^gs://b/r: no Google Cloud credentials found'):
    storage.probe('gs://b/r')
