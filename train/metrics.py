"""Host-side metrics: window averages, metrics.jsonl (written and read back), TensorBoard events,
the progress line."""

import json
import math
import time

import numpy as np
from absl import logging

from data import storage

# Metrics reported as their value at the logging step rather than a window mean: by name, and by
# suffix for per-layer state (entropy trigger: a window mean of the trigger step means nothing).
_POINT_METRICS = ('learning_rate', 'step')
_POINT_SUFFIXES = ('/trigger_step', '/h_tok_ema', '/ramp_weight')


def _expert_summary(counts_E: np.ndarray) -> dict:
  """Experts that got no token in the window, and each expert's share of the assignments."""
  return {'dead_experts': int(np.sum(counts_E == 0)), 'expert_load': _shares(counts_E).tolist()}


def _cluster_summary(counts_HN: np.ndarray) -> dict:
  """Per routing head, each k-means cluster's share of the tokens nearest to it: [H][N]."""
  return {'cluster_load': _shares(counts_HN).tolist()}


def _shares(counts: np.ndarray) -> np.ndarray:
  return counts / np.maximum(counts.sum(-1, keepdims=True), 1e-12)


# Vector metrics (`.../<suffix>` count vectors from the train step): summed over the logging
# window and written as the summaries above under the same prefix (`layer_i/moe/expert_load`),
# never themselves. Summaries that are lists go to metrics.jsonl only, not to TensorBoard.
VECTOR_SUMMARIES = {'expert_counts': _expert_summary, 'cluster_counts': _cluster_summary}


def drop_records_after(path: str, step: int) -> int:
  """Rewrites the JSONL file at `path` without the records whose 'step' exceeds `step` (atomic:
  a temporary file renamed over it); returns how many were dropped. A missing file is fine."""
  if not storage.exists(path):
    return 0
  lines = storage.read_text(path).splitlines(keepends=True)
  keep = [line for line in lines if not line.strip() or _step_of(line) <= step]
  if len(keep) == len(lines):
    return 0
  storage.write_text(path, ''.join(keep))
  return len(lines) - len(keep)


def _step_of(line: str) -> float:
  try:
    return json.loads(line).get('step', -math.inf)
  except ValueError:  # a torn last line from a killed run: drop it
    return math.inf


def _read_jsonl(workdir: str) -> list[dict]:
  path = storage.join(workdir, 'metrics.jsonl')
  if not storage.exists(path):
    raise FileNotFoundError(
      f'{path} not found: --workdir must be a directory written by train.train'
    )
  records = []
  for number, line in enumerate(storage.read_text(path).splitlines(), 1):
    if line.strip():
      try:
        record = json.loads(line)
      except ValueError as e:
        raise ValueError(f'{path} line {number}: not JSON ({e})') from None
      if not isinstance(record, dict) or 'step' not in record:
        raise ValueError(f'{path} line {number}: not a metrics record with a step')
      records.append(record)
  return records


def _one_per_step(records: list[dict]) -> list[dict]:
  by_step = {r['step']: r for r in records}  # a resumed run's repeat of a step wins
  return [by_step[s] for s in sorted(by_step)]


def read_metrics(workdir: str) -> list[dict]:
  """Training records of DIR/metrics.jsonl (those with a `loss`; held-out evaluation records
  have `eval_*` keys only), one per step (a resumed run's repeat wins), sorted."""
  return _one_per_step([r for r in _read_jsonl(workdir) if 'loss' in r])


def read_eval_metrics(workdir: str) -> list[dict]:
  """Held-out evaluation records of DIR/metrics.jsonl (`eval_loss`, no `loss`), one per step."""
  return _one_per_step([r for r in _read_jsonl(workdir) if 'eval_loss' in r and 'loss' not in r])


class _ObjectEventsFile:
  """A TensorBoard events file on object storage, written through data.storage: the whole object
  is uploaded at every flush (tensorboardX's own gs:// writer does the same, but uploads again when
  it is garbage-collected, retrying for minutes when the endpoint is gone)."""

  def __init__(self, location: str):
    self.location, self._data, self._closed = location, bytearray(), False

  def write(self, data: bytes) -> None:
    self._data += data

  def flush(self) -> None:
    if not self._closed:
      storage.write_bytes(self.location, bytes(self._data))

  def close(self) -> None:
    self.flush()
    self._closed = True


class _ObjectEventsFactory:
  def open(self, location: str) -> _ObjectEventsFile:
    return _ObjectEventsFile(location)

  def directory_check(self, location: str) -> None:
    pass  # object stores have no directories


def _summary_writer(location: str):
  from tensorboardX import SummaryWriter, record_writer  # pylint: disable=g-import-not-at-top

  for kind in storage.REMOTE_SCHEMES:
    record_writer.register_writer_factory(kind, _ObjectEventsFactory())
  return SummaryWriter(location)


class MetricsLogger:
  """Accumulates per-step host metrics and writes one record per logging window.

  Only the primary process writes files; every process may call it.
  """

  def __init__(
    self,
    workdir: str,
    *,
    total_steps: int,
    tokens_per_step: int,
    flops_per_token: float,
    peak_flops: float,
    primary: bool = True,
    resume_step: int | None = None,
  ):
    """With `resume_step`, records of later steps in an existing metrics.jsonl (written after
    the checkpoint the run resumes from, and about to be written again) are dropped first, so
    readers see one record per step."""
    self.total_steps, self.tokens_per_step = total_steps, tokens_per_step
    self.flops_per_token, self.peak_flops = flops_per_token, peak_flops
    self.primary = primary
    self._window: dict[str, list[float]] = {}
    self._counts: dict[str, np.ndarray] = {}
    self._window_steps = 0
    self._t0 = time.perf_counter()
    self._jsonl = self._tb = None
    if primary:
      if resume_step is not None:
        drop_records_after(storage.join(workdir, 'metrics.jsonl'), resume_step)
      self._jsonl = storage.AppendLog(storage.join(workdir, 'metrics.jsonl'))
      self._tb = _summary_writer(storage.join(workdir, 'tb'))

  def restart_clock(self) -> None:
    """Starts a fresh timing window (after compilation, restore or evaluation)."""
    self._window, self._counts, self._window_steps, self._t0 = {}, {}, 0, time.perf_counter()

  def add(self, metrics: dict) -> None:
    for name, value in metrics.items():
      if name.rpartition('/')[2] in VECTOR_SUMMARIES:
        self._counts[name] = self._counts.get(name, 0) + np.asarray(value, np.float64)
      else:
        self._window.setdefault(name, []).append(float(np.asarray(value)))
    self._window_steps += 1

  def write(self, step: int) -> dict:
    """Closes the window ending at `step`: returns and records its summary."""
    elapsed = time.perf_counter() - self._t0
    record = {'step': step}
    for name, values in self._window.items():
      point = name in _POINT_METRICS or name.endswith(_POINT_SUFFIXES)
      record[name] = values[-1] if point else float(np.mean(values))
    record.pop('finite', None)
    for name, counts in self._counts.items():
      prefix, _, suffix = name.rpartition('/')
      record.update(
        {f'{prefix}/{k}' if prefix else k: v for k, v in VECTOR_SUMMARIES[suffix](counts).items()}
      )
    steps_per_sec = self._window_steps / max(elapsed, 1e-9)
    record['tokens_per_sec'] = steps_per_sec * self.tokens_per_step
    record['step_time'] = 1.0 / max(steps_per_sec, 1e-9)
    if self.peak_flops > 0:
      record['mfu'] = record['tokens_per_sec'] * self.flops_per_token / self.peak_flops
    self.record(step, record)
    eta = (self.total_steps - step) / max(steps_per_sec, 1e-9)
    mfu = f' mfu {100 * record["mfu"]:.1f}%' if 'mfu' in record else ''
    logging.info(
      'step %d/%d  loss %.4f  lr %.2e  %.0f tok/s  %.3f s/step%s  eta %s',
      step,
      self.total_steps,
      record.get('loss', math.nan),
      record.get('learning_rate', math.nan),
      record['tokens_per_sec'],
      record['step_time'],
      mfu,
      _duration(eta),
    )
    self.restart_clock()
    return record

  def record(self, step: int, record: dict) -> None:
    """Writes an arbitrary record (e.g. held-out metrics) to metrics.jsonl and TensorBoard."""
    if not self.primary:
      return
    self._jsonl.write(json.dumps(record) + '\n')
    self._jsonl.flush()
    for name, value in record.items():
      if name != 'step' and isinstance(value, (int, float)):
        self._tb.add_scalar(name, value, step)
    self._tb.flush()

  def close(self) -> None:
    if self.primary:
      self._jsonl.close()
      self._tb.close()


def _duration(seconds: float) -> str:
  seconds = int(seconds)
  return (
    f'{seconds // 3600}h{seconds % 3600 // 60:02d}m'
    if seconds >= 3600
    else f'{seconds // 60}m{seconds % 60:02d}s'
  )
