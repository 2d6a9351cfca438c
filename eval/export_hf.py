"""`python -m eval.export_hf --workdir=DIR --out=DIR [--step=N] [--overwrite]`: a checkpoint as a
Hugging Face folder that `transformers.AutoModelForCausalLM.from_pretrained` and
`AutoTokenizer.from_pretrained` load with no custom code.

Writes config.json, model.safetensors (float32, with the `safetensors` package: no torch needed),
generation_config.json, the tokenizer files (`eval.hf_tokenizer`) and README.md, a model card
naming the source run and step, the architecture, the data, the tokens seen and the held-out
numbers with how they were evaluated. Only models with an exact transformers equivalent are
exported (`eval.hf_format.family`); anything else is refused in one line. Every check runs before
anything is written. `--workdir` and `--out` may be local or gs://BUCKET/PATH (`data.storage`). A
local folder appears whole or not at all (written beside `--out`, then renamed); a bucket has no
rename, so there each file is uploaded whole and config.json last: a folder without it does not
load. docs/hf.md.
"""

import json
import sys

import jax
import numpy as np
import safetensors.numpy
from absl import app, flags
from flax import nnx

from configs import cli, schema
from data import corpus, storage
from eval import hf_format, hf_tokenizer
from model import plan
from model.config import ConfigError
from train import restore
from train.checkpoint import Checkpointer


def _check_out(out: str, overwrite: bool) -> None:
  if storage.isfile(out) or (storage.listdir(out) and not overwrite):
    raise ConfigError(f'--out={out} exists and is not an empty directory (pass --overwrite)')


def _model_card(cfg: schema.Config, workdir: str, step: int, fam: str, spec: str) -> str:
  """README.md: where the weights come from and what is known about them."""
  layer_plan = plan.build(cfg.model, cfg.train.seq_len)
  tokens = step * cfg.train.batch_size * cfg.train.seq_len
  lines = [
    f'# {storage.basename(storage.resolve(workdir))} (step {step})',
    '',
    f'Exported by `python -m eval.export_hf` from the run `{storage.resolve(workdir)}`, checkpoint',
    f"step {step}, as `{hf_format.FAMILIES[fam]}`; its logits equal the source model's to float",
    'precision (the export refuses any model without an exact equivalent).',
    '',
    '## Model',
    f'- {layer_plan.params / 1e6:.3f}M parameters, {layer_plan.active_params / 1e6:.3f}M active per '
    f'token; {cfg.model.num_layers} layers, d_model {cfg.model.d_model}, vocabulary '
    f'{cfg.model.vocab_size}, trained with sequences of {cfg.train.seq_len} tokens.',
    f'- every layer: {layer_plan.layers[0].description}',
    f'- tokenizer: `{spec}` (EOS `{hf_tokenizer.EOS_TOKEN}` ends a document; no BOS).',
    '',
    '## Training data',
    f'- {cfg.data.path or "the default corpus (the Python standard library source)"}; tokens seen: {tokens:,} '
    f'({step} steps of {cfg.train.batch_size} x {cfg.train.seq_len}).',
  ]
  result_path = storage.join(workdir, 'eval', f'step_{step}.json')
  lines += ['', '## Held-out evaluation']
  if storage.exists(result_path):
    r = storage.read_json(result_path)
    bpb = r.get('bits_per_byte')
    lines.append(
      f'- loss {r["loss"]:.4f} nats/token'
      + (f', {bpb:.4f} bits per byte' if bpb is not None else '')
      + f' on {r.get("tokens", "?")} held-out tokens, evaluation: {r.get("evaluation", "?")}, '
      f'causal model: {r.get("causal")} (`python -m eval.evaluate --workdir=... --step={step}`).'
    )
  else:
    lines.append(
      f'- none recorded for step {step} (run `python -m eval.evaluate --workdir=... --step={step}`).'
    )
  return '\n'.join(lines) + '\n'


def export(workdir: str, out: str, step: int | None = None, overwrite: bool = False) -> dict:
  """Writes the Hugging Face folder `out` from `workdir`'s checkpoint; returns a summary."""
  cfg = restore.read_run_config(workdir)
  fam = hf_format.family(cfg.model)  # refuses before anything is read or written
  _check_out(out, overwrite)
  step = restore.checkpoint_step(Checkpointer(workdir, cfg.checkpoint, read_only=True), step)
  _, spec = restore.run_tokenizer_identity(workdir, cfg.data)
  tokenizer = restore.run_tokenizer(workdir, cfg.data)
  files = hf_tokenizer.tokenizer_files(spec, cfg.train.seq_len)
  cfg, step, model = restore.restore_model(workdir, step)
  state = jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(model, nnx.Param)))
  tensors = hf_format.to_hf(state, cfg.model, fam)
  config = hf_format.hf_config(
    cfg.model, fam, eos_id=tokenizer.eos_id, max_positions=cfg.train.seq_len
  )
  generation = {'eos_token_id': tokenizer.eos_id, 'bos_token_id': None, 'pad_token_id': None}
  files.update(
    {
      'config.json': json.dumps(config, indent=2),
      'generation_config.json': json.dumps(generation, indent=2),
      'README.md': _model_card(cfg, workdir, step, fam, spec),
    }
  )
  metadata = {'format': 'pt', 'source_run': storage.resolve(workdir), 'source_step': str(step)}
  blobs = {'model.safetensors': safetensors.numpy.save(tensors, metadata)}
  blobs.update({name: text.encode('utf-8') for name, text in files.items()})
  _write_folder(out, blobs)
  return {
    'workdir': workdir,
    'step': step,
    'out': out,
    'architecture': hf_format.FAMILIES[fam],
    'tensors': len(tensors),
    'tokenizer': spec,
  }


def _write_folder(out: str, blobs: dict[str, bytes]) -> None:
  """The folder `out` holding `blobs` ({name: bytes}) and nothing else (see the module docstring)."""
  if storage.is_remote(out):
    storage.rmtree(out)  # --overwrite (checked): the old folder goes first, config.json with it
    for name in sorted(blobs, key=lambda n: n == 'config.json'):  # config.json last
      storage.write_bytes(storage.join(out, name), blobs[name])
    return
  staging = storage.sibling(out, 'export')
  try:
    for name, data in blobs.items():
      storage.write_bytes(storage.join(staging, name), data)
    storage.rmtree(out)
    storage.move(staging, out)
  except BaseException:
    storage.rmtree(staging)
    raise


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  f = flags.FLAGS
  try:
    result = export(f.workdir, f.out, f.step, f.overwrite)
  except (ConfigError, corpus.DataError, hf_format.ExportError) as e:
    print(f'error: {e}', file=sys.stderr)
    sys.exit(1)
  print(json.dumps(result))


def run():
  flags.DEFINE_string('workdir', None, 'Run directory written by train.train.')
  flags.DEFINE_string('out', None, 'Folder to write (must not exist, or be empty).')
  flags.DEFINE_integer('step', None, 'Checkpoint step; default: the newest.')
  flags.DEFINE_bool('overwrite', False, 'Replace --out if it exists and is not empty.')
  flags.mark_flags_as_required(['workdir', 'out'])
  app.run(main, flags_parser=cli.parse_flags)


if __name__ == '__main__':
  run()
