"""Tokenizers: ids in, text out. Only the byte-level tokenizer exists so far.

Byte level: ids 0..255 are the bytes themselves, id 256 (EOS) ends a document. No text is ever
out of vocabulary, and a token covers exactly one byte of text (EOS none), which is what lets
evaluation report bits per byte: `bits_per_byte = sum(nll_nats) / ln(2) / num_bytes(targets)`.
"""

import numpy as np

TOKENIZERS = ('byte',)


class ByteTokenizer:
  """UTF-8 bytes as ids, plus one end-of-document id."""

  vocab_size = 257
  byte_level = True  # one token = one byte of text (EOS none), so bits per byte are defined
  eos_id = 256
  dtype = np.uint16  # storage dtype of token arrays on disk

  @property
  def fingerprint(self) -> str:
    """A short stable name; prepared data records it and caches are keyed by it."""
    return 'byte-v1'

  def encode(self, text: str | bytes, *, add_eos: bool = False) -> np.ndarray:
    """Text (str is UTF-8 encoded first) -> uint16 ids; `add_eos` appends the EOS id."""
    data = text.encode('utf-8') if isinstance(text, str) else bytes(text)
    ids = np.frombuffer(data, dtype=np.uint8).astype(self.dtype)
    return np.append(ids, self.dtype(self.eos_id)) if add_eos else ids

  def decode(self, ids) -> str:
    """Ids -> text. EOS is dropped, invalid UTF-8 becomes U+FFFD, ids > 256 raise ValueError."""
    ids = np.asarray(ids).reshape(-1)
    if ids.size and (ids.min() < 0 or ids.max() > self.eos_id):
      raise ValueError(f'ids must lie in [0, {self.eos_id}] for the byte tokenizer; got '
                       f'[{ids.min()}, {ids.max()}] (restrict sampling to vocab_size={self.vocab_size})')
    return ids[ids != self.eos_id].astype(np.uint8).tobytes().decode('utf-8', errors='replace')

  def bytes_per_token(self, ids):
    """Per-token byte counts (1 for a byte, 0 for EOS), same shape; works on numpy and jax arrays."""
    return (ids != self.eos_id).astype(np.int32)

  def num_bytes(self, ids) -> int:
    """How many bytes of text a run of (target) ids represents."""
    return int(self.bytes_per_token(np.asarray(ids)).sum())


def get_tokenizer(name: str) -> ByteTokenizer:
  """The tokenizer called `name` (config field `data.tokenizer`)."""
  if name == 'byte':
    return ByteTokenizer()
  raise ValueError(f'unknown tokenizer {name!r}; expected one of {TOKENIZERS}')
