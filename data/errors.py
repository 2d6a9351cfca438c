"""The one error type of the data layer, so entry points catch it once and print its line."""


class DataError(ValueError):
  """A dataset, input or tokenizer that cannot be used; the message is one line for the CLI."""
