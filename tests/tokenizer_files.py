"""A small byte-level BPE tokenizer.json trained on given documents, shared by the data tests."""


def write_bpe_tokenizer(docs, path: str, vocab_size: int = 300) -> str:
  """Trains a Hugging Face byte-level BPE on `docs`, saves it to `path`, returns the path."""
  import tokenizers  # pylint: disable=g-import-not-at-top
  from tokenizers import decoders, models, pre_tokenizers, trainers  # pylint: disable=g-import-not-at-top

  hf = tokenizers.Tokenizer(models.BPE())
  hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  hf.decoder = decoders.ByteLevel()
  hf.train_from_iterator(
    docs,
    trainers.BpeTrainer(
      vocab_size=vocab_size,
      special_tokens=['<|endoftext|>'],
      show_progress=False,
      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    ),
  )
  hf.save(path)
  return path
