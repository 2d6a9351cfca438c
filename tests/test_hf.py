"""Hugging Face export and import (eval/hf_*.py, eval/export_hf.py, eval/import_hf.py), without
torch: weights round-trip exactly, the tokenizer file encodes to our ids, bad input is one line and
writes nothing. Agreement with transformers itself is `make hf-check` (docs/hf.md)."""

import json
import os

import jax
import numpy as np
import pytest
import safetensors.numpy
import tokenizers
from flax import nnx

from configs import base, moe_topk, schema
from data.tokenizer import get_tokenizer
from eval import export_hf, hf_format, hf_tokenizer, import_hf
from model import plan
from model.config import ConfigError
from model.transformer import Transformer
from train.restore import restore_model


def _params(cfg, seed: int = 0) -> dict:
  model = Transformer(cfg, rngs=nnx.Rngs(seed))
  return jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(model, nnx.Param)))


def _folder(path, config, seed: int = 0) -> str:
  """A Hugging Face folder of random weights of the :tiny experiment `config`."""
  cfg = schema.load(config, 1)
  fam = hf_format.family(cfg.model)
  os.makedirs(path, exist_ok=True)
  tensors = hf_format.to_hf(_params(cfg.model, seed), cfg.model, fam)
  safetensors.numpy.save_file(tensors, os.path.join(path, 'model.safetensors'))
  with open(os.path.join(path, 'config.json'), 'w') as f:
    json.dump(hf_format.hf_config(cfg.model, fam, eos_id=256, max_positions=64), f)
  for name, text in hf_tokenizer.tokenizer_files('byte', 64).items():
    with open(os.path.join(path, name), 'w') as f:
      f.write(text)
  return str(path)


@pytest.mark.parametrize(
  'module, moe, expected',
  [
    (base, {}, 'llama'),
    (moe_topk, {}, 'mixtral'),
    (moe_topk, {'renormalize': False}, 'qwen2_moe'),
    (moe_topk, {'every': 2}, 'qwen2_moe'),  # dense MLPs between the MoE layers
    (moe_topk, {'renormalize': False, 'qk_norm': True}, 'olmoe'),
  ],
  ids=['llama', 'mixtral', 'qwen2_moe', 'qwen2_moe_every_2', 'olmoe'],
)
def test_weights_round_trip_exactly(module, moe, expected):
  c = module.get_config('tiny')
  c.attention.qk_norm = moe.pop('qk_norm', False)
  c.moe.update(**moe)
  cfg = schema.load(c, 1).model
  fam = hf_format.family(cfg)
  assert fam == expected
  model = nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0)))
  assert plan.build(cfg).params == sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
  params = _params(cfg)
  tensors = hf_format.to_hf(params, cfg, fam)
  assert all(t.ndim in (1, 2) for t in tensors.values())  # torch Linear layout [out, in]
  back = hf_format.from_hf(tensors, cfg, fam)
  jax.tree.map(np.testing.assert_array_equal, back, params)
  exported = hf_format.hf_config(cfg, fam, eos_id=256, max_positions=64)
  imported = hf_format.model_config(exported, cfg)  # the same model (an MoE's hidden as mlp_dim)
  assert hf_format.hf_config(imported, fam, eos_id=256, max_positions=64) == exported
  jax.tree.map(np.testing.assert_array_equal, hf_format.from_hf(tensors, imported, fam), params)


def test_import_then_export_is_the_identity(tmp_path):
  """HF folder -> run directory (step 0) -> HF folder: every tensor equal; the run's model is the
  folder's; the tokenizer is byte again; the run's config reads back through configs/from_run.py."""
  from configs import from_run  # pylint: disable=g-import-not-at-top

  c = moe_topk.get_config('tiny')
  c.data.cache_dir = str(tmp_path / 'corpus')
  folder = _folder(tmp_path / 'hf', moe_topk.get_config('tiny'))
  result = import_hf.import_folder(folder, str(tmp_path / 'run'), c)
  assert result['architecture'] == 'MixtralForCausalLM' and result['tokenizer'] == 'byte'
  cfg, step, model = restore_model(str(tmp_path / 'run'))
  assert step == 0 and cfg.data.tokenizer == 'byte'
  assert schema.load(from_run.get_config(str(tmp_path / 'run')), 1).model == cfg.model
  with open(tmp_path / 'run' / 'dataset.json', 'w') as f:  # what training writes first
    json.dump({'tokenizer': 'byte-v1', 'tokenizer_spec': 'byte'}, f)
  out = export_hf.export(str(tmp_path / 'run'), str(tmp_path / 'again'))
  assert out['architecture'] == 'MixtralForCausalLM' and out['step'] == 0
  first = safetensors.numpy.load_file(os.path.join(folder, 'model.safetensors'))
  again = safetensors.numpy.load_file(str(tmp_path / 'again' / 'model.safetensors'))
  assert first.keys() == again.keys()
  for name in first:
    np.testing.assert_array_equal(first[name], again[name], err_msg=name)
  card = (tmp_path / 'again' / 'README.md').read_text()
  assert str(tmp_path / 'run') in card and 'step 0' in card
  exported = json.loads((tmp_path / 'again' / 'config.json').read_text())
  assert exported['architectures'] == ['MixtralForCausalLM'] and exported['eos_token_id'] == 256
  assert sorted(os.listdir(tmp_path / 'again')) == sorted(
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
  del model


def test_tokenizer_file_encodes_to_our_ids():
  text = 'def f(x):\n\treturn "héllo 🙂"  # ünïcode\n'
  tok = tokenizers.Tokenizer.from_str(hf_tokenizer.tokenizer_files('byte', 64)['tokenizer.json'])
  ours = get_tokenizer('byte')
  assert tok.encode(text + hf_tokenizer.EOS_TOKEN).ids == ours.encode(text, add_eos=True).tolist()
  assert tok.decode(ours.encode(text).tolist()) == text
  config = json.loads(hf_tokenizer.tokenizer_files('byte', 64)['tokenizer_config.json'])
  assert config['eos_token'] == hf_tokenizer.EOS_TOKEN and config['add_bos_token'] is False


def _refusal(config_module, arg='tiny', **fields):
  c = config_module.get_config(arg)
  for path, value in fields.items():
    group, name = path.split('__')
    c[group][name] = value
  with pytest.raises(hf_format.ExportError) as e:
    hf_format.family(schema.load(c, 1).model)
  assert '\n' not in str(e.value) and 'exportable: dense (llama)' in str(e.value)
  return str(e.value)


def test_models_without_an_exact_equivalent_are_refused():
  from configs import (  # pylint: disable=g-import-not-at-top
    moe_expert_choice,
    moe_lossfree,
    routing_transformer,
    uoe,
  )

  assert 'routing attention' in _refusal(routing_transformer)
  assert 'smha attention' in _refusal(uoe)
  assert "moe.router='expert_choice'" in _refusal(moe_expert_choice)
  assert 'moe.bias_rate' in _refusal(moe_lossfree, moe__score='softmax')
  assert "moe.score='sigmoid'" in _refusal(moe_topk, moe__score='sigmoid', moe__renormalize=True)
  assert 'moe.shared_experts=1' in _refusal(moe_topk, moe__shared_experts=1)
  assert 'exports only as OLMoE' in _refusal(base, attention__qk_norm=True)
  assert 'capacity execution drops' in _refusal(
    moe_topk, moe__execution='capacity', moe__capacity_factor=1.0
  )
  c = moe_topk.get_config('tiny')
  c.moe.update(execution='capacity', capacity_factor=4.0)  # every assignment kept: exact
  assert hf_format.family(schema.load(c, 1).model) == 'mixtral'


def test_bad_input_is_one_line_and_writes_nothing(tmp_path):
  folder = _folder(tmp_path / 'hf', base.get_config('tiny'))
  c = base.get_config('tiny')
  c.data.cache_dir = str(tmp_path / 'corpus')

  def refused(fn, match):
    before = sorted(os.listdir(tmp_path))
    with pytest.raises((ConfigError, hf_format.ExportError), match=match) as e:
      fn()
    assert '\n' not in str(e.value)
    assert sorted(os.listdir(tmp_path)) == before, 'something was written'

  def edited(**changes):
    cfg = json.loads((tmp_path / 'hf' / 'config.json').read_text())
    bad = tmp_path / 'bad'
    bad.mkdir(exist_ok=True)
    for name in os.listdir(folder):
      (bad / name).write_bytes((tmp_path / 'hf' / name).read_bytes())
    (bad / 'config.json').write_text(json.dumps({**cfg, **changes}))
    return str(bad)

  run = str(tmp_path / 'run')
  refused(lambda: import_hf.import_folder(str(tmp_path), run, c), 'has no config.json')
  bad = edited(model_type='gpt2')
  refused(lambda: import_hf.import_folder(bad, run, c), "model_type='gpt2' is not supported")
  bad = edited(rope_scaling={'rope_type': 'yarn', 'factor': 4.0})
  refused(lambda: import_hf.import_folder(bad, run, c), 'rope_scaling=.* is not supported')
  bad = edited(model_type='qwen2_moe', shared_expert_intermediate_size=64)
  refused(lambda: import_hf.import_folder(bad, run, c), 'shared_expert_intermediate_size=64')
  bad = edited(model_type='olmoe', clip_qkv=8.0)
  refused(lambda: import_hf.import_folder(bad, run, c), 'clip_qkv=8.0 is not supported')
  bad = edited(attention_bias=True)
  refused(lambda: import_hf.import_folder(bad, run, c), 'attention_bias=True is not supported')
  bad = edited(intermediate_size=96)
  refused(lambda: import_hf.import_folder(bad, run, c), r'mlp.gate_proj.weight: shape \(128, 64\)')
  os.remove(os.path.join(bad, 'model.safetensors'))
  (tmp_path / 'bad' / 'config.json').write_text((tmp_path / 'hf' / 'config.json').read_text())
  refused(lambda: import_hf.import_folder(bad, run, c), 'has no model.safetensors')
  import_hf.import_folder(folder, run, c)
  refused(lambda: import_hf.import_folder(folder, run, c), 'already holds a run')
  with open(os.path.join(run, 'dataset.json'), 'w') as f:
    json.dump({'tokenizer': 'byte-v1', 'tokenizer_spec': 'byte'}, f)
  refused(lambda: export_hf.export(run, folder), 'exists and is not an empty directory')
  export_hf.export(run, folder, overwrite=True)  # --overwrite replaces it whole
  assert (
    sorted(os.listdir(folder))[0] == 'README.md'
    and str(tmp_path / 'run') in (tmp_path / 'hf' / 'README.md').read_text()
  )
  empty = tmp_path / 'empty_run'
  empty.mkdir()
  (empty / 'config.json').write_text((tmp_path / 'run' / 'config.json').read_text())
  refused(lambda: export_hf.export(str(empty), str(tmp_path / 'x')), 'no complete checkpoint')


@pytest.mark.parametrize('model_type', ['unigram', 'bpe'])
def test_sentencepiece_becomes_a_tokenizer_json_with_our_ids(tmp_path, model_type):
  """A Unigram SentencePiece model converts (checked on the verification texts, with the EOS piece
  special); a BPE one is refused in one line."""
  import sentencepiece as spm  # pylint: disable=g-import-not-at-top

  texts = hf_tokenizer.verification_texts(limit=60_000)
  spm.SentencePieceTrainer.train(
    sentence_iterator=iter(texts),
    model_prefix=str(tmp_path / 'sp'),
    vocab_size=300,
    model_type=model_type,
    character_coverage=1.0,
    minloglevel=2,
  )
  spec = f'sentencepiece:{tmp_path / "sp.model"}'
  if model_type == 'bpe':
    with pytest.raises(hf_format.ExportError, match='only Unigram SentencePiece models'):
      hf_tokenizer.tokenizer_files(spec, 64)
    return
  files = hf_tokenizer.tokenizer_files(spec, 64)
  tok = tokenizers.Tokenizer.from_str(files['tokenizer.json'])
  ours = get_tokenizer(spec)
  eos = json.loads(files['tokenizer_config.json'])['eos_token']
  assert tok.token_to_id(eos) == ours.eos_id
  text = 'def  f(x):\n\treturn  x  # é 日本\n'
  assert (
    tok.encode(text + eos, add_special_tokens=False).ids == ours.encode(text, add_eos=True).tolist()
  )


def test_hf_tokenizer_is_carried_over_with_an_eos(tmp_path):
  from tests.tokenizer_files import write_bpe_tokenizer  # pylint: disable=g-import-not-at-top

  docs = hf_tokenizer.verification_texts(limit=20_000)
  spec = 'hf:' + write_bpe_tokenizer(docs, str(tmp_path / 'tokenizer.json'))
  ours = get_tokenizer(spec)
  files = hf_tokenizer.tokenizer_files(spec, 64)
  tok = tokenizers.Tokenizer.from_str(files['tokenizer.json'])
  eos = json.loads(files['tokenizer_config.json'])['eos_token']
  assert tok.token_to_id(eos) == ours.eos_id
  for text in docs[:20]:
    assert tok.encode(text, add_special_tokens=False).ids == ours.encode(text).tolist()
