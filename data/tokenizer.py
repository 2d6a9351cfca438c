"""Tokenizers: byte level (default), SentencePiece (`sentencepiece:PATH`) and Hugging Face
`tokenizers` (`hf:PATH` to a tokenizer.json). PATH is a local file or a gs:// / s3:// object (read
through `data.storage`); nothing else is ever downloaded.

Byte level: ids 0..255 are the bytes themselves, id 256 (EOS) ends a document. No text is ever
out of vocabulary, and a token covers exactly one byte of text (EOS none), which is what lets
evaluation report bits per byte: `bits_per_byte = sum(nll_nats) / ln(2) / num_bytes(targets)`.

Every tokenizer has `vocab_size` (ids are < it, EOS included), `eos_id`, `dtype` (the smallest
unsigned integer type that holds every id, used on disk), `byte_level`, `spec` (the string that
rebuilds it) and `fingerprint` (a hash of the tokenizer file: prepared data and workdirs record it).
"""

import hashlib

import numpy as np

from data import storage
from data.errors import DataError


class TokenizerError(DataError):
  """A tokenizer spec or file that cannot be used."""


def smallest_dtype(vocab_size: int) -> np.dtype:
  """uint8 / uint16 / uint32: the narrowest type whose range holds ids 0..vocab_size-1."""
  for dtype in (np.uint8, np.uint16, np.uint32):
    if vocab_size - 1 <= np.iinfo(dtype).max:
      return np.dtype(dtype)
  raise TokenizerError(f'vocab_size={vocab_size} does not fit uint32')


class ByteTokenizer:
  """UTF-8 bytes as ids, plus one end-of-document id."""

  vocab_size = 257
  byte_level = True  # one token = one byte of text (EOS none), so bits per byte are defined
  eos_id = 256
  dtype = np.uint16  # storage dtype of token arrays on disk
  spec = 'byte'

  @property
  def fingerprint(self) -> str:
    """A short stable name; prepared data records it and caches are keyed by it."""
    return 'byte-v1'

  def encode(self, text: str | bytes, *, add_eos: bool = False) -> np.ndarray:
    """Text (str is UTF-8 encoded first) -> uint16 ids; `add_eos` appends the EOS id."""
    data = text.encode('utf-8') if isinstance(text, str) else bytes(text)
    ids = np.frombuffer(data, dtype=np.uint8).astype(self.dtype)
    return np.append(ids, self.dtype(self.eos_id)) if add_eos else ids

  def encode_batch(self, texts: list[str]) -> list[np.ndarray]:
    """Documents -> id arrays, each ending with EOS."""
    return [self.encode(t, add_eos=True) for t in texts]

  def decode(self, ids) -> str:
    """Ids -> text. EOS is dropped, invalid UTF-8 becomes U+FFFD, ids > 256 raise ValueError."""
    ids = np.asarray(ids).reshape(-1)
    if ids.size and (ids.min() < 0 or ids.max() > self.eos_id):
      raise ValueError(
        f'ids must lie in [0, {self.eos_id}] for the byte tokenizer; got '
        f'[{ids.min()}, {ids.max()}] (restrict sampling to vocab_size={self.vocab_size})'
      )
    return ids[ids != self.eos_id].astype(np.uint8).tobytes().decode('utf-8', errors='replace')

  def bytes_per_token(self, ids):
    """Per-token byte counts (1 for a byte, 0 for EOS), same shape; works on numpy and jax arrays."""
    return (ids != self.eos_id).astype(np.int32)

  def num_bytes(self, ids) -> int:
    """How many bytes of text a run of (target) ids represents."""
    return int(self.bytes_per_token(np.asarray(ids)).sum())


class _FileTokenizer:
  """Shared part of the file-backed tokenizers: fingerprint, EOS handling, dtype, decode."""

  byte_level = False  # a token covers a variable number of bytes
  kind = ''

  def __init__(self, path: str):
    self.path = path
    self.spec = f'{self.kind}:{path}'
    try:
      data = storage.read_bytes(path)
    except OSError as e:
      raise TokenizerError(
        f'tokenizer {self.spec!r}: cannot read the file ({e.strerror or type(e).__name__})'
      ) from None
    digest = hashlib.sha256(data).hexdigest()
    try:
      self._load(data)
    except Exception as e:  # the libraries raise assorted types for a bad file
      msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
      raise TokenizerError(f'tokenizer {self.spec!r} does not load: {msg}') from None
    self.fingerprint = f'{self.kind}-{digest[:16]}'
    eos = self._find_eos()
    self.eos_id = self._base_vocab if eos is None else eos  # no EOS piece: one id appended
    self.vocab_size = self._base_vocab + (eos is None)
    self.dtype = smallest_dtype(self.vocab_size).type

  def __getstate__(self):  # the library objects do not pickle; workers reload the file
    return {'path': self.path}

  def __setstate__(self, state):
    self.__init__(state['path'])

  def encode(self, text: str, *, add_eos: bool = False) -> np.ndarray:
    ids = np.asarray(self._encode([text])[0], dtype=self.dtype)
    return np.append(ids, self.dtype(self.eos_id)) if add_eos else ids

  def encode_batch(self, texts: list[str]) -> list[np.ndarray]:
    return [
      np.append(np.asarray(ids, dtype=self.dtype), self.dtype(self.eos_id))
      for ids in self._encode(texts)
    ]

  def decode(self, ids) -> str:
    ids = [int(i) for i in np.asarray(ids).reshape(-1) if i != self.eos_id]
    return self._decode(ids)

  def bytes_per_token(self, ids):
    raise NotImplementedError(f'{self.spec}: bits per byte need a byte-level tokenizer')


class SentencePieceTokenizer(_FileTokenizer):
  kind = 'sentencepiece'

  def _load(self, data: bytes):
    import sentencepiece as spm

    self._sp = spm.SentencePieceProcessor(model_proto=data)
    self._base_vocab = self._sp.get_piece_size()

  def _find_eos(self):
    eos = self._sp.eos_id()
    return eos if eos >= 0 else None

  def _encode(self, texts):
    return self._sp.encode(texts)

  def _decode(self, ids):
    return self._sp.decode(ids)


class HFTokenizer(_FileTokenizer):
  kind = 'hf'
  EOS_NAMES = ('</s>', '<|endoftext|>', '<eos>', '<|end_of_text|>', '[EOS]')

  def _load(self, data: bytes):
    import tokenizers

    self._tok = tokenizers.Tokenizer.from_str(data.decode('utf-8'))
    self._base_vocab = self._tok.get_vocab_size(with_added_tokens=True)

  def _find_eos(self):
    for name in self.EOS_NAMES:
      i = self._tok.token_to_id(name)
      if i is not None:
        return i
    return None

  def _encode(self, texts):
    return [e.ids for e in self._tok.encode_batch(texts, add_special_tokens=False)]

  def _decode(self, ids):
    return self._tok.decode(ids)


def get_tokenizer(name: str):
  """The tokenizer for a spec: `byte`, `sentencepiece:PATH` or `hf:PATH` (config `data.tokenizer`)."""
  if name == 'byte':
    return ByteTokenizer()
  kind, _, path = name.partition(':')
  if kind == 'sentencepiece' and path:
    return SentencePieceTokenizer(path)
  if kind == 'hf' and path:
    return HFTokenizer(path)
  raise TokenizerError(f'unknown tokenizer {name!r}; expected byte, sentencepiece:PATH or hf:PATH')
