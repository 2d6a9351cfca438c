"""The two Cloud Storage operations that files through epath cannot express, done with the client
library (data/storage.py calls them for gs:// locations; docs/storage.md):

- `create_if_absent`: an upload with the precondition "no live generation" (`ifGenerationMatch=0`),
  so exactly one of two racing writers creates the object: the workdir lock on a bucket;
- `probe`: one write and delete without retries, so an unreachable endpoint, missing credentials, a
  missing bucket or no permission fail in seconds, in one line naming the URL (gcsfs retries for
  about half a minute first).
"""

import os

from data import storage


def _client(location: str):
  from google.auth import exceptions as auth_exceptions  # pylint: disable=g-import-not-at-top
  from google.cloud import storage as gcs_storage  # pylint: disable=g-import-not-at-top

  try:
    return gcs_storage.Client()
  except auth_exceptions.DefaultCredentialsError:
    raise storage.StorageError(
      f'{location}: no Google Cloud credentials found; run `gcloud auth application-default '
      'login` or set GOOGLE_APPLICATION_CREDENTIALS (a local emulator: STORAGE_EMULATOR_HOST)'
    ) from None


def create_if_absent(location: str, data: bytes) -> bool:
  """Creates the object `location` holding `data`; False (nothing written) if it exists."""
  from google.api_core import exceptions  # pylint: disable=g-import-not-at-top

  bucket, key = storage.bucket_and_key(location)
  blob = _client(location).bucket(bucket).blob(key)
  try:
    blob.upload_from_string(data, if_generation_match=0, timeout=30)
  except exceptions.PreconditionFailed:
    return False
  return True


def probe(location: str, name: str) -> None:
  """Writes and deletes the object `name` (under `location`); a StorageError naming `location`."""
  from google.api_core import exceptions  # pylint: disable=g-import-not-at-top

  bucket, key = storage.bucket_and_key(name)
  endpoint = os.environ.get('STORAGE_EMULATOR_HOST', 'https://storage.googleapis.com')
  try:
    blob = _client(location).bucket(bucket).blob(key)
    blob.upload_from_string(b'probe', timeout=20, retry=None)
    blob.delete(timeout=20, retry=None)
  except exceptions.NotFound:
    raise storage.StorageError(
      f'{location}: bucket {bucket!r} does not exist (at {endpoint})'
    ) from None
  except (exceptions.Forbidden, exceptions.Unauthorized) as e:
    raise storage.StorageError(
      f'{location}: no permission to write ({e.code}: {storage.first_line(e)})'
    ) from None
  except storage.StorageError:
    raise
  except Exception as e:  # pylint: disable=broad-except  (connection refused, DNS, timeouts)
    raise storage.StorageError(
      f'{location}: cannot reach {endpoint} ({type(e).__name__}: {storage.first_line(e)})'
    ) from None
