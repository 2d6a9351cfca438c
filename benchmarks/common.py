"""Helpers shared by the benchmark scripts: timing, device description, result files."""

import json
import os
import platform
import time

import jax

from configs import cli

cli.prepare_process()  # a benchmark starts jax as the commands do (host memory, no absent TPU)

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'results')


def device_description() -> str:
  d = jax.devices()[0]
  kind = getattr(d, 'device_kind', d.platform)
  return f'{len(jax.devices())}x {kind} ({d.platform}), host {platform.node()} with {os.cpu_count()} CPUs'


def time_calls(fn, n: int, warmup: int = 2) -> list[float]:
  """Wall time of each of `n` calls of `fn()` (which must block until its result is ready)."""
  for _ in range(warmup):
    fn()
  times = []
  for _ in range(n):
    t0 = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t0)
  return times


def time_alternating(calls: dict, rounds: int, warmup: int = 1) -> dict[str, list[float]]:
  """Wall times of `rounds` calls of each blocking `calls[name]()`, alternating between them
  within each round (so all meet the same machine load), after `warmup` untimed calls each."""
  for fn in calls.values():
    for _ in range(warmup):
      fn()
  times = {name: [] for name in calls}
  for _ in range(rounds):
    for name, fn in calls.items():
      t0 = time.perf_counter()
      fn()
      times[name].append(time.perf_counter() - t0)
  return times


def bare_train_step(cfg):
  """A zero-argument function running `cfg`'s jitted train step once on one fixed training batch
  (state carried from call to call; returns the step's metrics without waiting for them, so
  back-to-back calls dispatch asynchronously): the step without the loop around it."""
  from configs import schema, sharding  # pylint: disable=g-import-not-at-top
  from data import corpus, pipeline  # pylint: disable=g-import-not-at-top
  from train import mesh as mesh_lib  # pylint: disable=g-import-not-at-top
  from train.step import make_step_fns  # pylint: disable=g-import-not-at-top

  fns = make_step_fns(cfg, mesh_lib.make_mesh(cfg.mesh), sharding.rules(cfg.mesh.rules))
  tokens = corpus.load_split(corpus.resolve_dataset(cfg.data), 'train')
  local = next(
    iter(
      pipeline.train_dataset(
        tokens,
        schema.DataConfig(),  # defaults: seed 0, windows, no workers
        seq_len=cfg.train.seq_len,
        global_batch_size=cfg.train.batch_size,
      )
    )
  )
  batch = pipeline.make_global_batch(local, fns.batch_sharding)
  state = [fns.init()]

  def step():
    state[0], metrics = fns.train_step(state[0], batch)
    return metrics

  return step


def write_result(name: str, result: dict) -> str:
  """Writes benchmarks/results/NAME.json with the device and date, and returns its path."""
  os.makedirs(RESULTS, exist_ok=True)
  result = {
    'benchmark': name,
    'device': device_description(),
    'jax': jax.__version__,
    'date': time.strftime('%Y-%m-%d'),
    **result,
  }
  path = os.path.join(RESULTS, f'{name}.json')
  with open(path, 'w') as f:
    json.dump(result, f, indent=2)
  return path


def print_table(rows: list[dict]) -> None:
  if not rows:
    return
  keys = list(rows[0])
  widths = [max(len(k), *(len(_fmt(r[k])) for r in rows)) for k in keys]
  print('  '.join(k.ljust(w) for k, w in zip(keys, widths)))
  for r in rows:
    print('  '.join(_fmt(r[k]).ljust(w) for k, w in zip(keys, widths)))


def _fmt(v) -> str:
  return f'{v:.4g}' if isinstance(v, float) else str(v)


DOCS_RESULTS = os.path.join(os.path.dirname(RESULTS), '..', 'docs', 'results.md')


def write_docs_section(heading: str, body: str, path: str = DOCS_RESULTS) -> str:
  """Writes `## heading` + body into docs/results.md, replacing that section if present.

  Each evidence command owns one section; the others are kept as they are.
  """
  path = os.path.normpath(path)
  text = (
    open(path).read()
    if os.path.exists(path)
    else (
      '# Results\n\nSections are written by the commands they name; rerunning one replaces '
      'its section.\n'
    )
  )
  lines, out, skipping = text.splitlines(), [], False
  for line in lines:
    if line.startswith('## '):
      skipping = line[3:].strip() == heading
    if not skipping:
      out.append(line)
  section = f'## {heading}\n\n{body.strip()}\n'
  new = '\n'.join(out).rstrip() + '\n\n' + section
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path + '.tmp', 'w') as f:
    f.write(new)
  os.replace(path + '.tmp', path)
  return path
