"""The top ops of a `jax.profiler` trace of a step: op name, seconds per step, share of the step.

Used by benchmarks/step_roofline.py. On XLA:CPU the HLO thunks run on the client and intra-op
pool threads; their complete events are summed by name, without executor envelopes and without
control-flow containers (whose bodies are counted op by op). Given the compiled program's HLO
text, each op is also named by the source line that made it (`op_sources`), and the ops' time is
summed per source line: `ffi_call.69` says nothing, `model/gmm.py:197` does.
"""

import collections
import glob
import gzip
import json
import os
import re
import tempfile
import time

import jax


def op_sources(hlo_text: str) -> dict[str, str]:
  """{HLO op name: 'file:line' of the innermost Python frame that traced it} from a compiled
  program's text (its FileNames / FileLocations / StackFrames tables and each op's
  stack_frame_id). Files in this repository are relative to it, library files start at their
  package (`optax/_src/update.py:42`); ops without a frame are left out."""
  tables = {name: {} for name in _TABLES}
  section, sources = None, {}
  for line in hlo_text.splitlines():
    if line in _TABLES:
      section = line
      continue
    row = re.match(r'(\d+) (.*)', line) if section else None
    if row:
      tables[section][int(row.group(1))] = row.group(2)
      continue
    section = None if line.strip() else section
    op = re.match(r'\s*(?:ROOT )?%?([\w.\-]+) = .*metadata=\{[^}]*stack_frame_id=(\d+)', line)
    if op:
      sources[op.group(1)] = int(op.group(2))
  where = {}
  for frame_id, text in tables['StackFrames'].items():
    location = tables['FileLocations'].get(int(_field(text, 'file_location_id')), '')
    file_name = tables['FileNames'].get(int(_field(location, 'file_name_id') or -1), '').strip('"')
    if file_name:
      where[frame_id] = f'{_short_path(file_name)}:{_field(location, "line")}'
  return {name: where[frame] for name, frame in sources.items() if frame in where}


def _field(text: str, key: str) -> str | None:
  found = re.search(rf'\b{key}=(\d+)', text)
  return found.group(1) if found else None


def _short_path(path: str) -> str:
  if 'site-packages' + os.sep in path:  # a library, wherever its environment is
    return path.split('site-packages' + os.sep, 1)[1]
  return os.path.relpath(path, _REPO) if path.startswith(_REPO + os.sep) else path


def top_ops(
  step_fn, n_steps: int, top: int = 15, unmeasurable=RuntimeError, hlo_text: str | None = None
) -> dict:
  """Sums complete ('X') events by name over the perfetto trace's XLA execution threads; a
  profiler that fails or writes no trace raises `unmeasurable` with one line. With the step's
  compiled HLO text, each op also gets its source line and `top_sources` sums the ops by line."""
  jax.block_until_ready(step_fn())
  with tempfile.TemporaryDirectory() as d:
    try:
      with jax.profiler.trace(d, create_perfetto_trace=True):
        t0 = time.perf_counter()
        for _ in range(n_steps):
          jax.block_until_ready(step_fn())
        wall = time.perf_counter() - t0
    except Exception as e:  # pylint: disable=broad-except
      raise unmeasurable(f'jax.profiler.trace failed here: {type(e).__name__}: {e}') from None
    paths = glob.glob(os.path.join(d, '**', '*.trace.json.gz'), recursive=True)
    if not paths:
      raise unmeasurable('jax.profiler.trace wrote no perfetto *.trace.json.gz on this platform')
    with gzip.open(paths[0], 'rt') as f:
      trace = json.load(f)
  events = trace['traceEvents'] if isinstance(trace, dict) else trace
  threads = {(e.get('pid'), e.get('tid')): e['args'].get('name', '') for e in events
             if e.get('ph') == 'M' and e.get('name') == 'thread_name'}  # fmt: skip
  by_thread = collections.Counter()
  for e in events:
    if e.get('ph') == 'X':
      by_thread[threads.get((e.get('pid'), e.get('tid')), '?')] += float(e.get('dur', 0))
  exec_threads = {k for k, name in threads.items() if name.startswith(_EXEC_THREADS)}
  totals, containers, count = collections.Counter(), collections.Counter(), 0
  for e in events:
    if e.get('ph') == 'X' and (e.get('pid'), e.get('tid')) in exec_threads:
      name, sec = e['name'], float(e.get('dur', 0)) / 1e6
      if name.startswith(_SKIP):
        continue
      (containers if _CONTAINER.match(name) else totals)[name] += sec
      count += 1
  sources = op_sources(hlo_text) if hlo_text else {}
  ops = [{'op': name, 'seconds_per_step': s / n_steps, 'share_of_step': s / wall,
          **({'source': sources.get(name, '?')} if hlo_text else {})}
         for name, s in totals.most_common(top)]  # fmt: skip
  by_source = collections.Counter()
  for name, s in totals.items():
    by_source[sources.get(name, '?')] += s
  return {
    'threads_counted': sorted({threads[k] for k in exec_threads}),
    'events_counted': count,
    'thread_busy_s': {k: v / 1e6 for k, v in by_thread.most_common(12)},
    'profiled_steps': n_steps, 'profiled_wall_s': wall,
    'ops_s_per_step': sum(totals.values()) / n_steps,
    'top_ops': ops,
    **({'top_sources': [{'source': src, 'seconds_per_step': s / n_steps, 'share_of_step': s / wall}
                        for src, s in by_source.most_common(top)]} if hlo_text else {}),
    'containers_s_per_step': {k: v / n_steps for k, v in containers.most_common(8)},
    'note': ('complete (ph X) events summed by name on the XLA:CPU execution threads named in '
             'threads_counted, without the executor envelopes (ThunkExecutor*, end: *, '
             'ThreadpoolListener*, SlinkyThreadPool*) and without control-flow containers (while, '
             'cond, conditional, call: their bodies are counted op by op; their totals are in '
             'containers_s_per_step); '
             'share = summed duration / wall time of the profiled steps; ops on different threads '
             'overlap, so ops_s_per_step can exceed the step time; top_sources: the same sums by '
             "the source line that traced each op ('?': no frame in the HLO metadata)")
    if ops else 'the trace has no per-op events on the XLA execution threads here',
  }  # fmt: skip


_TABLES = ('FileNames', 'FunctionNames', 'FileLocations', 'StackFrames')  # HLO text's frame tables
_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # local: this repository
_EXEC_THREADS = ('tf_XLAPjRtCpuClient', 'tf_XLAEigen')  # XLA:CPU: the client and intra-op pool
_SKIP = ('ThunkExecutor', 'ThreadpoolListener', 'SlinkyThreadPool', 'end: ')  # envelopes, waits
_CONTAINER = re.compile(r'(while|conditional|cond|call)(\.\d+)?$')  # bodies are counted op by op
