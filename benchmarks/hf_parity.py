"""The transformers half of `make hf-check`: what an exported folder computes in torch.

Runs in the torch environment only (torch, transformers, numpy; never jax or this project's
packages), as a script started by `benchmarks/hf_check.py`, which compares the numbers with ours.
Loads the folder with `AutoModelForCausalLM.from_pretrained(..., dtype=torch.float32)` and
`AutoTokenizer.from_pretrained`, then writes `--out` (JSON) and `--logits_out` (.npy):
- the logits [B, L, V] of the token windows in `--tokens` (.npy of ids [B, L]);
- the greedy continuation (`generate(do_sample=False, max_new_tokens=N)`) of `--prompt_ids`.
  It stops at EOS, as our sampler does (both keep the EOS id and stop), and only draws ids the
  tokenizer has (`len(tokenizer)`: the embedding may be wider), as our sampler does; the
  continuation without that restriction is reported too, for information;
- the tokenizer's ids of `--text` (encoded with its defaults) and their decoding;
- the class names and what loading reported (missing, unexpected or mismatched weights).

Usage: .venv-hf/bin/python benchmarks/hf_parity.py --model=DIR --tokens=X.npy --prompt_ids=1,2,3
         --text=TEXT --logits_out=Y.npy --out=R.json [--max_new_tokens=16]
"""

import argparse
import importlib.metadata
import json
import platform

import numpy as np
import torch
import transformers


def _loading_info(info: dict) -> dict:
  """What from_pretrained reported, as sorted lists of strings (JSON-ready)."""
  return {key: sorted(str(v) for v in (values or ())) for key, values in info.items()}


def _generate(model, prompt_ids: list[int], max_new_tokens: int, suppress: list[int]) -> list[int]:
  """Greedy continuation of `prompt_ids` (the new ids only), never drawing an id in `suppress`."""
  inputs = torch.tensor([prompt_ids], dtype=torch.long)
  with torch.no_grad():
    out = model.generate(
      inputs,
      attention_mask=torch.ones_like(inputs),
      do_sample=False,
      max_new_tokens=max_new_tokens,
      suppress_tokens=suppress or None,
      pad_token_id=model.generation_config.eos_token_id,  # batch of one: never used; no warning
    )
  return out[0, len(prompt_ids) :].tolist()


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument('--model', required=True, help='Exported Hugging Face folder.')
  p.add_argument('--tokens', required=True, help='.npy of token ids [B, L].')
  p.add_argument('--prompt_ids', required=True, help='Comma-separated prompt ids.')
  p.add_argument('--text', required=True, help='Text for the tokenizer check.')
  p.add_argument('--max_new_tokens', type=int, default=16)
  p.add_argument('--logits_out', required=True, help='.npy to write the logits [B, L, V] to.')
  p.add_argument('--out', required=True, help='JSON file to write.')
  args = p.parse_args()

  torch.manual_seed(0)
  model, info = transformers.AutoModelForCausalLM.from_pretrained(
    args.model, dtype=torch.float32, output_loading_info=True
  )
  model.eval()
  tokenizer = transformers.AutoTokenizer.from_pretrained(args.model)

  tokens = torch.from_numpy(np.load(args.tokens).astype(np.int64))
  with torch.no_grad():
    logits = model(input_ids=tokens).logits
  np.save(args.logits_out, logits.float().numpy())

  prompt_ids = [int(i) for i in args.prompt_ids.split(',')]
  vocab = model.config.vocab_size
  allowed = len(tokenizer)
  generated = _generate(model, prompt_ids, args.max_new_tokens, list(range(allowed, vocab)))
  unrestricted = _generate(model, prompt_ids, args.max_new_tokens, [])

  text_ids = tokenizer(args.text)['input_ids']
  result = {
    'model_class': type(model).__name__,
    'tokenizer_class': type(tokenizer).__name__,
    'attn_implementation': model.config._attn_implementation,
    'param_dtype': str(next(model.parameters()).dtype),
    'loading_info': _loading_info(info),
    'logits_shape': list(logits.shape),
    'eos_token_id': model.generation_config.eos_token_id,
    'tokenizer_len': allowed,
    'vocab_size': vocab,
    'generated': generated,
    'generated_unrestricted': unrestricted,
    'text_ids': list(text_ids),
    'text_decoded': tokenizer.decode(text_ids),
    'versions': {
      'torch': torch.__version__,
      'transformers': transformers.__version__,
      'tokenizers': importlib.metadata.version('tokenizers'),
      'safetensors': importlib.metadata.version('safetensors'),
      'numpy': np.__version__,
      'python': platform.python_version(),
    },
  }
  with open(args.out, 'w') as f:
    json.dump(result, f)


if __name__ == '__main__':
  main()
