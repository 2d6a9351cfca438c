"""The tools that read a run and write beside it, with the run in a bucket (gs://, on a local
fake-gcs-server): evaluation (in process and the command), sampling, a warm start from it, the
routing report, the Hugging Face export and import, and a sweep whose root is a bucket. One tiny run is trained into the bucket per module; a local
copy of it is the reference the bucket's results must equal."""

import json
import math
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
import safetensors.numpy
from flax import nnx

from configs import from_run, schema, tiny
from data import storage
from data.tokenizer import get_tokenizer
from eval import evaluate, export_hf, hf_tokenizer, import_hf, routing_report, sample
from model.config import ConfigError
from tests.gcs import create_bucket
from tests.tiny_runs import tiny_train_config
from tests.tokenizer_files import write_bpe_tokenizer
from train import sweep, warm_start
from train.train import train_and_evaluate

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_PNG = b'\x89PNG\r\n\x1a\n'


@pytest.fixture(scope='module')
def gcs_run(gcs_server, cache_dir, tmp_path_factory):
  """(bucket, workdir on it, a local copy of that workdir): configs/tiny.py trained 8 steps."""
  bucket = create_bucket(gcs_server, 'gcs-eval')
  workdir = storage.join(bucket, 'tiny')
  train_and_evaluate(tiny_train_config(cache_dir, steps=8, log_every=2), workdir)
  local = str(tmp_path_factory.mktemp('copy'))
  for name in storage.walk_files(workdir):
    storage.write_bytes(storage.join(local, name), storage.read_bytes(storage.join(workdir, name)))
  return bucket, workdir, local


def _params(workdir: str) -> dict:
  return jax.tree.map(
    np.asarray, nnx.to_pure_dict(nnx.state(evaluate.restore_model(workdir).model, nnx.Param))
  )


def test_evaluate_writes_its_result_into_the_bucket(gcs_run):
  _, workdir, local = gcs_run
  result = evaluate.evaluate_checkpoint(workdir)
  assert result['step'] == 8
  assert math.isfinite(result['loss']) and math.isfinite(result['bits_per_byte'])
  assert storage.read_json(storage.join(workdir, 'eval', 'step_8.json')) == result
  assert evaluate.evaluate_checkpoint(local) == result  # the same checkpoint, read from disk
  storage.remove(storage.join(workdir, 'eval', 'step_8.json'))
  proc = subprocess.run(  # the command, reaching the bucket through the emulator's variables
    [sys.executable, '-m', 'eval.evaluate', f'--workdir={workdir}'],
    cwd=ROOT,
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert json.loads(proc.stdout.strip().splitlines()[-1]) == result
  assert storage.read_json(storage.join(workdir, 'eval', 'step_8.json')) == result


def test_sample_reads_the_run_from_the_bucket(gcs_run):
  _, workdir, local = gcs_run
  out = sample.sample_checkpoint(workdir, 'def ', max_new_tokens=4, seed=1, top_k=20)
  assert out['step'] == 8 and 1 <= len(out['tokens']) <= 4
  again = sample.sample_checkpoint(local, 'def ', max_new_tokens=4, seed=1, top_k=20)
  assert list(again['tokens']) == list(out['tokens']) and again['completion'] == out['completion']


def test_warm_start_from_a_run_on_the_bucket(gcs_run, cache_dir):
  _, workdir, _ = gcs_run
  cfg = tiny_train_config(cache_dir, steps=8, init_from=f'{workdir}@8', init_from_mode='copy')
  state = warm_start.load(cfg)  # train.init_from=gs://...@8: checked and read, nothing written
  expected = nnx.to_pure_dict(nnx.state(evaluate.restore_model(workdir).model))
  jax.tree.map(np.testing.assert_array_equal, state, jax.tree.map(np.asarray, expected))


def test_routing_report_lands_in_the_bucket(gcs_run):
  bucket, workdir, _ = gcs_run
  data = routing_report.report(workdir)
  report = storage.join(workdir, 'report')
  assert data['plots'] and data['plots'][0]['file'] == 'loss.png'
  for plot in data['plots']:
    assert storage.read_bytes(storage.join(report, plot['file']))[:8] == _PNG
  assert 'loss.png' in storage.read_text(storage.join(report, 'routing_report.md'))
  assert storage.read_json(storage.join(report, 'routing_report.json'))['final_step'] == 8
  elsewhere = storage.join(bucket, 'reports', 'tiny')  # --out on the bucket, no checkpoint
  routing_report.report(workdir, out=elsewhere, checkpoint=False)
  assert 'routing_report.md' in storage.listdir(elsewhere)


def test_hf_export_to_the_bucket_and_import_back(gcs_run, cache_dir, tmp_path):
  bucket, workdir, local = gcs_run
  out = storage.join(bucket, 'hf')
  result = export_hf.export(workdir, out)
  assert result['step'] == 8 and result['tokenizer'] == 'byte'
  names = storage.listdir(out)
  assert names == sorted(
    [
      'README.md',
      'config.json',
      'generation_config.json',
      'model.safetensors',
      'special_tokens_map.json',
      'tokenizer.json',
      'tokenizer_config.json',
    ]
  )
  assert workdir in storage.read_text(storage.join(out, 'README.md'))
  with pytest.raises(ConfigError, match='exists and is not an empty directory'):
    export_hf.export(workdir, out)
  export_hf.export(workdir, out, overwrite=True)
  assert storage.listdir(out) == names
  tensors = safetensors.numpy.load(storage.read_bytes(storage.join(out, 'model.safetensors')))
  export_hf.export(local, str(tmp_path / 'hf'))
  expected = safetensors.numpy.load_file(str(tmp_path / 'hf' / 'model.safetensors'))
  assert tensors.keys() == expected.keys()
  for name in tensors:
    np.testing.assert_array_equal(tensors[name], expected[name], err_msg=name)

  c = tiny.get_config()
  c.data.cache_dir = str(cache_dir)
  run = storage.join(bucket, 'imported')
  back = import_hf.import_folder(out, run, c)
  assert back['tokenizer'] == 'byte' and storage.exists(storage.join(run, 'config.json'))
  assert not [n for n in storage.listdir(bucket) if n.startswith('.import-')]  # staging gone
  assert schema.load(from_run.get_config(run), 1).model == evaluate.read_run_config(run).model
  jax.tree.map(np.testing.assert_array_equal, _params(run), _params(workdir))

  # A tokenizer of its own is copied into the run and named there (read from the bucket).
  bpe = write_bpe_tokenizer(hf_tokenizer.verification_texts(limit=20_000), str(tmp_path / 't.json'))
  other = storage.join(bucket, 'hf-bpe')
  for name in names:
    source = bpe if name == 'tokenizer.json' else storage.join(out, name)
    storage.write_bytes(storage.join(other, name), storage.read_bytes(source))
  run = storage.join(bucket, 'imported-bpe')
  back = import_hf.import_folder(other, run, c)
  assert back['tokenizer'] == 'hf:' + storage.join(run, 'tokenizer.json')
  assert evaluate.read_run_config(run).data.tokenizer == back['tokenizer']
  assert get_tokenizer(back['tokenizer']).vocab_size == 300
  assert not [n for n in storage.listdir(bucket) if n.startswith('.import-')]


def test_a_sweep_with_its_root_on_the_bucket(gcs_run, cache_dir, tmp_path):
  bucket, _, _ = gcs_run
  path = tmp_path / 'exp.py'
  path.write_text(
    'from configs import tiny\n'
    'def get_config(arg=None):\n'
    '  c = tiny.get_config()\n'
    f'  c.data.cache_dir = {str(cache_dir)!r}\n'
    '  c.train.update(steps=8, log_every=2)\n'  # the module's run: its compiled programs
    '  return c\n'
    'def sweep_seeds():\n  return [{"train.seed": 0}, {"train.seed": 1}]\n'
  )
  root = storage.join(bucket, 'sweep')
  rows = sweep.run_sweep(str(path), 'seeds', root)
  assert [r['run'] for r in rows] == ['train.seed=0', 'train.seed=1']
  for r in rows:
    assert storage.exists(storage.join(root, r['run'], 'eval', 'step_8.json'))
  assert storage.read_text(storage.join(root, 'results.md')).count('\n') == 4
  assert storage.read_text(storage.join(root, 'results.csv')).startswith('run,train.seed,')
  assert storage.read_bytes(storage.join(root, 'train.seed.png'))[:8] == _PNG
  assert sweep.finished(storage.join(root, rows[0]['run']), 8)
