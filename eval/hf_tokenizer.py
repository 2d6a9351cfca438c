"""A run's tokenizer as Hugging Face tokenizer files that encode text to exactly our ids.

- `byte`: a `tokenizers` BPE without merges over the 256 byte symbols of the GPT-2 byte-to-unicode
  alphabet, in which byte b has id b, plus the special token `<|endoftext|>` with our EOS id 256.
  Text encodes to its UTF-8 bytes; the end of a document is the EOS token (written in the text or
  appended by the caller), as our `encode(text, add_eos=True)`.
- `hf:PATH`: the tokenizer.json itself, with `<|endoftext|>` added when it has no EOS piece (our
  tokenizer appends one id after its vocabulary, which is where `tokenizers` adds it too).
- `sentencepiece:PATH` (a Unigram model, SentencePiece's default): converted to a `tokenizers`
  Unigram with the model's own normalisation (its precompiled character map, whitespace handling
  and `▁` prefix), its control pieces as special tokens. The conversion is checked at export against
  SentencePiece itself on `verification_texts()` (Python standard library source and a Unicode
  sample) and refused on the first difference. A BPE SentencePiece model is refused.
As everywhere in transformers, the EOS token written in a text encodes to EOS.
"""

import glob
import json
import os

import tokenizers
from tokenizers import Regex, decoders, models, normalizers, pre_tokenizers

from data import storage
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
    tok = sentencepiece_tokenizer(spec.partition(':')[2])
    _check_same_ids(tok, ours, spec)
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


def sentencepiece_tokenizer(path: str) -> tokenizers.Tokenizer:
  """A SentencePiece Unigram model as a `tokenizers.Tokenizer` (see the module docstring)."""
  from sentencepiece import sentencepiece_model_pb2  # pylint: disable=g-import-not-at-top

  proto = sentencepiece_model_pb2.ModelProto()
  proto.ParseFromString(storage.read_bytes(path))
  norm, trainer = proto.normalizer_spec, proto.trainer_spec
  if trainer.model_type != 1:  # UNIGRAM
    raise ExportError(
      f'data.tokenizer=sentencepiece:{path}: only Unigram SentencePiece models are exported '
      f'(this one has model_type {trainer.model_type})'
    )
  vocab = [(piece.piece, piece.score) for piece in proto.pieces]
  tok = tokenizers.Tokenizer(models.Unigram(vocab, trainer.unk_id, trainer.byte_fallback))
  steps = [normalizers.Precompiled(norm.precompiled_charsmap)] if norm.precompiled_charsmap else []
  if norm.remove_extra_whitespaces:
    steps += [normalizers.Strip(left=True, right=True), normalizers.Replace(Regex(' {2,}'), ' ')]
  tok.normalizer = normalizers.Sequence([*steps, normalizers.Replace(' ', '▁')])
  scheme = 'always' if norm.add_dummy_prefix else 'never'
  tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement='▁', prepend_scheme=scheme, split=False)
  tok.decoder = decoders.Metaspace(replacement='▁', prepend_scheme=scheme, split=False)
  control = [p.piece for p in proto.pieces if p.type in (2, 3)]  # UNKNOWN, CONTROL
  tok.add_special_tokens(
    [tokenizers.AddedToken(s, special=True, normalized=False) for s in control]
  )
  return tok


def verification_texts(chunk: int = 2000, limit: int = 400_000) -> list[str]:
  """Pieces of text on which a converted tokenizer must give our ids: the standard library's
  source (the default corpus, offline everywhere) and a Unicode and whitespace sample."""
  texts = [
    '日本語 🙂 ＡＢＣ ① a\u00a0b\u200bc  spaced\t\ttabs\n\n  new  ',
    '  leading',
    'trailing  ',
    ' ',
  ]
  total = 0
  stdlib = os.path.dirname(os.__file__)  # local: this interpreter's standard library
  for path in sorted(glob.glob(os.path.join(stdlib, '*.py'))):  # local: the standard library
    with open(path, encoding='utf-8', errors='replace') as f:  # local: the standard library
      source = f.read()
    texts += [source[i : i + chunk] for i in range(0, len(source), chunk)]
    total += len(source)
    if total >= limit:
      break
  return texts


def _check_same_ids(tok: tokenizers.Tokenizer, ours, spec: str) -> None:
  for text in verification_texts():
    theirs = tok.encode(text, add_special_tokens=False).ids
    if theirs != ours.encode(text).tolist():
      raise ExportError(
        f'data.tokenizer={spec!r}: the tokenizer.json conversion encodes {text[:40]!r}... '
        'differently from SentencePiece; not exported'
      )
