"""A run's tokenizer as Hugging Face tokenizer files that encode text to exactly our ids.

- `byte`: a `tokenizers` BPE without merges over the 256 byte symbols of the GPT-2 byte-to-unicode
  alphabet, in which byte b has id b, plus the special token `<|endoftext|>` with our EOS id 256.
  Text encodes to its UTF-8 bytes; the end of a document is the EOS token (written in the text or
  appended by the caller), as our `encode(text, add_eos=True)`.
- `hf:PATH`: the tokenizer.json itself, with `<|endoftext|>` added when it has no EOS piece (our
  tokenizer appends one id after its vocabulary, which is where `tokenizers` adds it too).
- `sentencepiece:PATH` is refused: no conversion to tokenizer.json has been verified exact.
"""

import json

import tokenizers
from tokenizers import decoders, models, pre_tokenizers

from data.tokenizer import get_tokenizer
from eval.hf_format import ExportError

EOS_TOKEN = '<|endoftext|>'


def _byte_symbols() -> list[str]:
  """The GPT-2 byte-to-unicode alphabet: the printable symbol standing for each byte 0..255."""
  printable = [*range(ord('!'), ord('~') + 1), *range(ord('¡'), ord('¬') + 1)]
  printable += range(ord('®'), ord('ÿ') + 1)
  symbols, extra = {}, 0
  for b in range(256):
    if b in printable:
      symbols[b] = chr(b)
    else:
      symbols[b] = chr(256 + extra)
      extra += 1
  return [symbols[b] for b in range(256)]


def byte_tokenizer() -> tokenizers.Tokenizer:
  """The byte tokenizer (ids 0..255 the bytes, 256 EOS) as a `tokenizers.Tokenizer`."""
  vocab = {symbol: b for b, symbol in enumerate(_byte_symbols())}
  tok = tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=[]))
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
  tok.decoder = decoders.ByteLevel()
  tok.add_special_tokens([tokenizers.AddedToken(EOS_TOKEN, special=True, normalized=False)])
  return tok


def tokenizer_files(spec: str, max_length: int) -> dict[str, str]:
  """{file name: text} of the Hugging Face tokenizer for our tokenizer `spec`."""
  ours = get_tokenizer(spec)
  if spec == 'byte':
    tok = byte_tokenizer()
  elif spec.startswith('hf:'):
    tok = tokenizers.Tokenizer.from_file(spec[3:])
    if tok.id_to_token(ours.eos_id) is None:
      tok.add_special_tokens([tokenizers.AddedToken(EOS_TOKEN, special=True, normalized=False)])
  else:
    raise ExportError(
      f'data.tokenizer={spec!r}: SentencePiece export is not supported (byte and hf: are)'
    )
  eos = tok.id_to_token(ours.eos_id)
  if tok.token_to_id(eos) != ours.eos_id:
    raise ExportError(f'tokenizer {spec!r}: EOS id {ours.eos_id} has no token in tokenizer.json')
  config = {
    'tokenizer_class': 'PreTrainedTokenizerFast',
    'eos_token': eos,
    'bos_token': None,
    'pad_token': None,
    'unk_token': None,
    'add_bos_token': False,
    'add_eos_token': False,
    'model_max_length': max_length,
    'clean_up_tokenization_spaces': False,
  }
  return {
    'tokenizer.json': tok.to_str(pretty=True),
    'tokenizer_config.json': json.dumps(config, indent=2),
    'special_tokens_map.json': json.dumps({'eos_token': eos}, indent=2),
  }
