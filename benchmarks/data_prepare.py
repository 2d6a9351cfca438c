"""Claim: `data.prepare` tokenizes text at N MB/s with the byte tokenizer and 2 processes.

Prepares the default corpus's files (this interpreter's stdlib, ~30 MB of text files) into a
temporary directory twice (the file list three times over, ~95 MB), with 1 and with 2 worker processes, and reports MB of input text per
second of wall time (tokenize + write the TensorStore arrays + metadata), and their ratio.

Usage: python -m benchmarks.data_prepare
"""

import os
import shutil
import tempfile
import time

from data import corpus, prepare  # no jax here: spawned workers re-import this module


def measure(processes: int, root: str, files: list[str]) -> dict:
  out = tempfile.mkdtemp(prefix='bench-prepare-')
  try:
    t0 = time.perf_counter()
    meta = prepare.prepare_dataset(
      os.path.join(root, '**/*.py'),
      os.path.join(out, 'ds'),
      files=(root, files),
      fmt='text',
      processes=processes,
    )
    seconds = time.perf_counter() - t0
  finally:
    shutil.rmtree(out, ignore_errors=True)
  mb = sum(os.path.getsize(os.path.join(root, f)) for f in files) / 1e6
  return {
    'processes': processes,
    'input_mb': round(mb, 1),
    'seconds': round(seconds, 2),
    'mb_per_s': mb / seconds,
    'tokens': sum(meta['tokens'].values()),
  }


def main():
  from benchmarks.common import print_table, write_result

  root, files = corpus.stdlib_files()
  files = files * 3  # ~95 MB, so the workers' start-up (~1 s) is not the whole measurement
  rows = [measure(p, root, files) for p in (1, 2)]
  print_table(rows)
  ratio = rows[1]['mb_per_s'] / rows[0]['mb_per_s']
  print(f'2 processes: {rows[1]["mb_per_s"]:.1f} MB/s ({ratio:.2f}x one process)')
  path = write_result(
    'data_prepare',
    {
      'tokenizer': 'byte',
      'rows': rows,
      'mb_per_s_2_processes': rows[1]['mb_per_s'],
      'speedup_2_vs_1': ratio,
      'cpu_count': os.cpu_count(),
      'load_average_1min': os.getloadavg()[0],
    },
  )
  print(f'wrote {path}')


if __name__ == '__main__':
  main()
