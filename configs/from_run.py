"""A run's own config, read back from its directory: resume, extend or retrain it exactly.

Usage: python -m train.train --config=configs/from_run.py:DIR --workdir=DIR --config.train.steps=N
(DIR local or gs://BUCKET/PATH.)
Also the config of a run directory made by `python -m eval.import_hf`, which has no experiment file.
Fields may be overridden on the command line as with any experiment (a resumed run refuses a change
to the model or the data).
"""

import json

import ml_collections

from data import storage


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  if not arg:
    raise ValueError('configs/from_run.py needs a run directory: --config=configs/from_run.py:DIR')
  path = storage.join(arg, 'config.json')
  try:
    tree = storage.read_json(path)
  except OSError as e:
    reason = e.strerror or type(e).__name__
    raise ValueError(f'configs/from_run.py:{arg}: cannot read {path} ({reason})') from None
  except storage.StorageError as e:
    raise ValueError(f'configs/from_run.py:{arg}: {e}') from None
  except json.JSONDecodeError as e:
    raise ValueError(f'configs/from_run.py:{arg}: {path} is not JSON ({e.msg})') from None
  return ml_collections.ConfigDict(tree)
