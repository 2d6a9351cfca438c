"""`python -m eval.import_hf --model_dir=DIR --workdir=DIR [--config=EXPERIMENT]`: a Hugging Face
Llama, Mixtral, Qwen2-MoE or OLMoE folder (safetensors) as a run directory of ours: config.json and a step-0
checkpoint that trains (`--config=configs/from_run.py:DIR`), evaluates and samples.

The model fields come from the folder's config.json (`eval.hf_format.model_config`: another
architecture, or an option we do not implement, is refused in one line naming it); everything else
(training, data, mesh) from the experiment `--config` (default configs/base.py). The tokenizer: a
folder exported from a byte-level run is our `byte` tokenizer again; any other tokenizer.json is
copied into the run directory and used as `hf:DIR/tokenizer.json`. Every check runs before
anything is written, and the run directory appears whole or not at all: it is written beside
`--workdir`, then moved in, config.json last. Both folders may be local or gs://BUCKET/PATH
(`data.storage`; on a bucket the move is a copy, so a reader may see checkpoints/ before
config.json, never a config.json without its checkpoint). docs/hf.md.
"""

import dataclasses
import json
import sys

import jax
import numpy as np
import safetensors.numpy
from absl import app, flags
from flax import nnx
from ml_collections import config_flags

from configs import cli, schema, sharding
from data import corpus, storage
from data.tokenizer import TokenizerError, get_tokenizer
from eval import hf_format, hf_tokenizer
from model.config import ConfigError
from train import mesh as mesh_lib
from train.checkpoint import Checkpointer
from train.step import init_state

_ONE_DEVICE = schema.MeshConfig(shape=(1, 1, 1, 1), rules='dp')


def read_tensors(model_dir: str) -> dict[str, np.ndarray]:
  """Every tensor of the folder's model.safetensors (or of the shards its index lists)."""
  index = storage.join(model_dir, 'model.safetensors.index.json')
  if storage.exists(index):
    files = sorted(set(storage.read_json(index)['weight_map'].values()))
  elif storage.exists(storage.join(model_dir, 'model.safetensors')):
    files = ['model.safetensors']
  else:
    raise hf_format.ExportError(f'--model_dir={model_dir} has no model.safetensors')
  tensors = {}
  for name in files:
    path = storage.join(model_dir, name)
    try:
      tensors.update(safetensors.numpy.load(storage.read_bytes(path)))
    except Exception as e:  # safetensors raises assorted types for a bad or unreadable file
      raise hf_format.ExportError(f'{path} does not load: {storage.first_line(e)}') from None
  return tensors


def _tokenizer_spec(model_dir: str, staging: str) -> str:
  """'byte' for our own byte tokenizer, else 'hf:PATH' of the copy in the run directory."""
  path = storage.join(model_dir, 'tokenizer.json')
  if not storage.exists(path):
    raise hf_format.ExportError(f'--model_dir={model_dir} has no tokenizer.json')
  text = storage.read_bytes(path)
  if json.loads(text) == json.loads(hf_tokenizer.byte_tokenizer().to_str()):
    return 'byte'
  storage.write_bytes(storage.join(staging, 'tokenizer.json'), text)
  return 'hf:' + storage.join(staging, 'tokenizer.json')


def import_folder(model_dir: str, workdir: str, experiment=None) -> dict:
  """Writes the run directory `workdir` from the Hugging Face folder `model_dir`."""
  config_path = storage.join(model_dir, 'config.json')
  if not storage.exists(config_path):
    raise hf_format.ExportError(f'--model_dir={model_dir} has no config.json')
  if storage.exists(storage.join(workdir, 'config.json')) or storage.exists(
    storage.join(workdir, 'checkpoints')
  ):
    raise ConfigError(f'--workdir={workdir} already holds a run; choose a new directory')
  hf = storage.read_json(config_path)
  if experiment is None:
    from configs import base  # pylint: disable=g-import-not-at-top

    experiment = base.get_config()
  cfg = schema.from_dict(experiment.to_dict())
  model = hf_format.model_config(hf, cfg.model)
  fam = hf_format.family(model)
  seq_len = min(cfg.train.seq_len, hf.get('max_position_embeddings') or cfg.train.seq_len)
  tensors = read_tensors(model_dir)
  staging = storage.sibling(workdir, 'import')
  try:
    spec = _tokenizer_spec(model_dir, staging)
    final_spec = spec.replace(staging, storage.resolve(workdir))
    tokenizer = get_tokenizer(spec)
    if tokenizer.vocab_size > model.vocab_size:
      raise hf_format.ExportError(
        f'tokenizer.json has {tokenizer.vocab_size} ids but config.json vocab_size='
        f'{model.vocab_size}'
      )
    data = dataclasses.replace(cfg.data, tokenizer=final_spec)
    train = dataclasses.replace(cfg.train, seq_len=seq_len)
    cfg = dataclasses.replace(cfg, model=model, data=data, train=train)
    schema.validate(cfg, jax.device_count())
    params = hf_format.from_hf(tensors, model, fam)
    one = dataclasses.replace(cfg, mesh=_ONE_DEVICE)
    state = init_state(
      one, mesh_lib.make_mesh(_ONE_DEVICE, jax.devices()[:1]), sharding.rules('dp')
    )
    _check_shapes(state['model'], params)
    nnx.replace_by_pure_dict(
      state['model'],
      jax.tree.map(lambda a: np.asarray(a, dtype=model.param_dtype), params),
    )
    storage.write_json(storage.join(staging, 'config.json'), cfg.to_dict(), indent=2)
    ckpt = Checkpointer(staging, cfg.checkpoint)
    ckpt.save(0, state)
    ckpt.close()
    storage.move_into(staging, workdir, last='config.json')
  finally:
    storage.rmtree(staging)
  return {
    'model_dir': model_dir,
    'workdir': workdir,
    'architecture': hf_format.FAMILIES[fam],
    'tokenizer': final_spec,
    'tensors': len(tensors),
    'train': f'python -m train.train --config=configs/from_run.py:{workdir} --workdir={workdir}',
  }


def _check_shapes(model_state, params: dict) -> None:
  """Every imported parameter has the shape the config builds (one line for the first misfit)."""
  built = nnx.to_pure_dict(model_state)
  paths = jax.tree_util.tree_flatten_with_path(params)[0]
  for path, value in paths:
    node = built
    for key in path:
      node = node[key.key]
    if tuple(node.shape) != tuple(np.shape(value)):
      name = '/'.join(str(k.key) for k in path)
      raise hf_format.ExportError(
        f'{name}: the folder gives shape {tuple(np.shape(value))}, config.json builds {node.shape}'
      )


def main(argv, config_flag):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  f = flags.FLAGS
  try:
    experiment = cli.config_value(config_flag) if f.config else None
    result = import_folder(f.model_dir, f.workdir, experiment)
  except (ConfigError, corpus.DataError, TokenizerError, hf_format.ExportError) as e:
    print(f'error: {e}', file=sys.stderr)
    sys.exit(1)
  print(json.dumps(result))


def run():
  config_flag = config_flags.DEFINE_config_file(
    'config', None, 'Experiment for the training, data and mesh fields (default configs/base.py).'
  )
  flags.DEFINE_string('model_dir', None, 'Hugging Face folder: config.json, model.safetensors.')
  flags.DEFINE_string('workdir', None, 'New run directory to write.')
  flags.mark_flags_as_required(['model_dir', 'workdir'])
  app.run(lambda argv: main(argv, config_flag), flags_parser=cli.parse_flags)


if __name__ == '__main__':
  run()
