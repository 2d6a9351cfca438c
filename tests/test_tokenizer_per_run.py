"""One tokenizer per run: sampling decodes with the run's dataset's tokenizer, and evaluation
refuses a `--data` dataset tokenized otherwise (its loss would mean nothing). No training: the
checks run before any checkpoint is read or anything compiles."""

import json
import os
import subprocess
import sys

import pytest

from configs import schema, tiny
from data import corpus, prepare
from data.errors import DataError
from data.tokenizer import get_tokenizer
from eval import evaluate
from eval import sample as sample_lib
from model.config import ConfigError
from tests.tokenizer_files import write_bpe_tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCS = [f'Document {i}: the quick brown fox jumps over {i * 7} lazy dogs.' for i in range(24)]


@pytest.fixture(scope='module')
def datasets(tmp_path_factory):
  """{'byte': dir, 'hf': dir}: the same small text prepared with two tokenizers, and the HF spec."""
  d = tmp_path_factory.mktemp('tok')
  write_bpe_tokenizer(DOCS, str(d / 'tokenizer.json'))
  os.makedirs(d / 'in')
  for i, doc in enumerate(DOCS):
    (d / 'in' / f'doc{i:03d}.txt').write_text(doc)
  out = {}
  for name, spec in (('byte', 'byte'), ('hf', f'hf:{d / "tokenizer.json"}')):
    out[name] = str(d / name)
    prepare.prepare_dataset(
      str(d / 'in' / '*.txt'), out[name], tokenizer=spec, heldout_fraction=0.3
    )
  out['hf_spec'] = f'hf:{d / "tokenizer.json"}'
  return out


def _run_dir(tmp_path, data_path, dataset_json=True):
  """A workdir as train.train leaves it, without checkpoints: config.json (+ dataset.json)."""
  c = tiny.get_config()
  c.data.path = data_path
  workdir = tmp_path / 'run'
  os.makedirs(workdir)
  with open(workdir / 'config.json', 'w') as f:
    json.dump(schema.load(c, 8).to_dict(), f)
  if dataset_json:
    meta = corpus.load_metadata(data_path)
    with open(workdir / 'dataset.json', 'w') as f:
      json.dump(
        {
          'tokenizer': meta['tokenizer']['fingerprint'],
          'tokenizer_spec': meta['tokenizer']['spec'],
          'dataset': meta['fingerprint'],
          'path': data_path,
        },
        f,
      )
  return str(workdir)


@pytest.mark.parametrize('dataset_json', [True, False], ids=['dataset.json', 'run_dataset'])
def test_evaluate_refuses_data_with_another_tokenizer(tmp_path, datasets, dataset_json):
  workdir = _run_dir(tmp_path, datasets['byte'], dataset_json)
  with pytest.raises(DataError) as e:
    evaluate.evaluate_checkpoint(workdir, data=datasets['hf'])
  message = str(e.value)
  assert '\n' not in message
  assert f'--data={datasets["hf"]} is tokenized with {datasets["hf_spec"]}' in message
  assert f'{workdir} was trained with byte' in message
  assert not os.path.exists(os.path.join(workdir, 'eval'))


def test_evaluate_accepts_other_text_with_the_same_tokenizer(tmp_path, datasets):
  workdir = _run_dir(tmp_path, datasets['hf'])
  other = str(tmp_path / 'other')
  prepare.prepare_dataset(
    os.path.join(datasets['byte'], '..', 'in', 'doc00*.txt'),
    other,
    tokenizer=datasets['hf_spec'],
    heldout_fraction=0.5,
  )
  with pytest.raises(ConfigError, match='no complete checkpoint'):  # past the tokenizer check
    evaluate.evaluate_checkpoint(workdir, data=other)


def test_evaluate_cli_prints_one_line(tmp_path, datasets):
  workdir = _run_dir(tmp_path, datasets['byte'])
  proc = subprocess.run(
    [sys.executable, '-m', 'eval.evaluate', f'--workdir={workdir}', f'--data={datasets["hf"]}'],
    cwd=ROOT,
    capture_output=True,
    text=True,
    timeout=120,
    env={**os.environ, 'JAX_PLATFORMS': 'cpu'},
  )
  assert proc.returncode == 1
  lines = [line for line in proc.stderr.splitlines() if line.startswith('error:')]
  assert len(lines) == 1 and 'is tokenized with hf:' in lines[0], proc.stderr
  assert 'Traceback' not in proc.stderr


@pytest.mark.parametrize('dataset_json', [True, False], ids=['dataset.json', 'run_dataset'])
def test_sample_uses_the_run_datasets_tokenizer(tmp_path, datasets, monkeypatch, dataset_json):
  workdir = _run_dir(tmp_path, datasets['hf'], dataset_json)  # data.tokenizer stays 'byte'
  hf = get_tokenizer(datasets['hf_spec'])
  seen = {}

  def fake_sample(model, prompt_ids, *, vocab_size, eos_id, **kw):
    seen.update(prompt_ids=list(prompt_ids), vocab_size=vocab_size, eos_id=eos_id)
    return list(prompt_ids) + list(hf.encode(' lazy dogs'))

  monkeypatch.setattr(
    evaluate, 'restore_model', lambda workdir, step: evaluate.RestoredModel(None, 3, None)
  )
  monkeypatch.setattr(sample_lib, 'sample', fake_sample)
  out = sample_lib.sample_checkpoint(workdir, 'the quick', max_new_tokens=4)
  assert seen == {
    'prompt_ids': list(hf.encode('the quick')),
    'vocab_size': hf.vocab_size,
    'eos_id': hf.eos_id,
  }
  assert out['completion'] == ' lazy dogs' and out['step'] == 3
