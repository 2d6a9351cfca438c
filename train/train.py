"""Entry point: `python -m train.train --config=configs/NAME.py --workdir=DIR [--config.a.b=v ...]`.

Trains, and resumes from the newest complete checkpoint in DIR if there is one (metrics.jsonl
then keeps one record per step). SIGTERM (a preemption) writes a final checkpoint and exits with
status 0; SIGINT (Ctrl-C) does the same and exits with 130, and a second Ctrl-C exits at once. A
step whose loss, gradient or new state is not finite is never applied: the run stops with the last
good checkpoint intact (`train.on_nonfinite='stop'`) or drops that batch and goes on ('skip',
stopping after `train.nonfinite_patience` such steps in a row).
"""

import signal
import sys
import time

import jax
from absl import app, flags, logging
from clu import parameter_overview
from flax import nnx
from ml_collections import config_flags

from configs import cli, schema, sharding
from data import corpus, pipeline, sources, storage
from model import plan
from model.config import ConfigError
from train import distributed, memory, warm_start
from train import evaluation as eval_lib
from train import mesh as mesh_lib
from train.checkpoint import Checkpointer, check_location
from train.lock import WorkdirLock, WorkdirLocked
from train.metrics import MetricsLogger
from train.step import make_step_fns
from train.workdir import (
  check_dataset,
  check_shared,
  describe_os_error,
  os_error_in,
  write_config,
)


class TrainingError(RuntimeError):
  """Training cannot continue; the message says why and where the last good checkpoint is."""


class Interrupted(Exception):
  """Ctrl-C stopped the run after its checkpoint was written."""


class _Preemption:
  """Turns SIGTERM and SIGINT into a flag the loop checks after every step.

  The first SIGINT restores Python's own handler, so a second Ctrl-C interrupts at once.
  """

  def __init__(self):
    self.requested = None  # the signal's name once one arrived
    self._previous = {
      sig: signal.signal(sig, self._handle) for sig in (signal.SIGTERM, signal.SIGINT)
    }

  def _handle(self, signum, frame):
    del frame
    self.requested = signal.Signals(signum).name
    if signum == signal.SIGINT:
      signal.signal(signal.SIGINT, self._previous[signal.SIGINT])

  def restore(self):
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)


def train_and_evaluate(cfg: schema.Config, workdir: str) -> dict:
  """Runs (or resumes) training; returns the last logged metrics record. Holds the workdir's
  lock throughout (`train.lock`: a second trainer on the same workdir is refused)."""
  estimate = memory.check(cfg, jax.device_count())  # before anything is written or compiled
  if estimate is not None:
    logging.info(
      'memory: at least %s (%s), over %d devices',
      memory.fmt_bytes(estimate.total),
      estimate.describe(),
      jax.device_count(),
    )
  workdir = check_location(workdir)
  storage.probe(workdir)  # every process writes checkpoint shards there: refuse before step 1
  check_shared(workdir)
  with WorkdirLock(workdir, enabled=jax.process_index() == 0):
    return _train(cfg, workdir)


def _train(cfg: schema.Config, workdir: str) -> dict:
  primary = jax.process_index() == 0
  dataset_dir = corpus.resolve_dataset(cfg.data)
  corpus.check_vocab(dataset_dir, cfg.model.vocab_size)
  ident = check_dataset(workdir, dataset_dir)
  warm = None  # a warm start's model, checked before anything is written; ignored on resume
  if cfg.train.init_from and not _has_checkpoint(workdir, cfg):
    warm = warm_start.load(cfg)
  write_config(cfg, workdir)
  if primary:
    storage.write_json(storage.join(workdir, 'dataset.json'), ident, indent=2)
  mesh = mesh_lib.make_mesh(cfg.mesh)
  rules = sharding.rules(cfg.mesh.rules)
  fns = make_step_fns(cfg, mesh, rules)
  heldout_tokens = corpus.load_split(dataset_dir, 'heldout') if cfg.eval.every_steps else None
  tokenizer = corpus.dataset_tokenizer(dataset_dir) if cfg.eval.every_steps else None
  eval_step = eval_lib.make_eval_step(fns, tokenizer) if cfg.eval.every_steps else None
  data_iter = iter(
    pipeline.train_dataset(
      sources.open_split(dataset_dir, 'train'),
      cfg.data,
      seq_len=cfg.train.seq_len,
      global_batch_size=cfg.train.batch_size,
      process_index=jax.process_index(),
      process_count=jax.process_count(),
    )
  )

  ckpt = Checkpointer(workdir, cfg.checkpoint)
  start, state = _restore_newest(ckpt, fns, data_iter)
  if start is None:
    start, state = 0, fns.init()
    if warm is not None:
      state = warm_start.place(state, warm)
      logging.info(
        'model from train.init_from=%s (%s)', cfg.train.init_from, cfg.train.init_from_mode
      )
    if primary:
      table = parameter_overview.get_parameter_overview(
        nnx.to_pure_dict(state['model']), include_stats=False
      )
      storage.write_text(storage.join(workdir, 'parameters.txt'), table + '\n')
      logging.info(
        'parameters: %s; per array in %s',
        table.splitlines()[-1].removeprefix('Total: '),
        storage.join(workdir, 'parameters.txt'),
      )

  tokens_per_step = cfg.train.batch_size * cfg.train.seq_len
  logger = MetricsLogger(
    workdir,
    total_steps=cfg.train.steps,
    tokens_per_step=tokens_per_step,
    flops_per_token=plan.build(cfg.model, cfg.train.seq_len).flops_per_token,
    peak_flops=cfg.train.peak_tflops * 1e12 * jax.device_count(),
    primary=primary,
    resume_step=start,
  )
  end = (
    cfg.train.steps
    if not cfg.train.stop_after
    else min(cfg.train.steps, start + cfg.train.stop_after)
  )
  preemption = _Preemption()
  record, pending, step, saved, bad_in_a_row = {}, None, start, start, 0

  def consume(done_step, metrics):
    nonlocal record, bad_in_a_row
    metrics = jax.device_get(metrics)
    if not metrics['finite']:
      bad_in_a_row += 1
      what = (
        f'non-finite loss, gradient or updated state at step {done_step} '
        f'(loss={float(metrics["loss"])}); the update was not applied'
      )
      if cfg.train.on_nonfinite == 'stop' or bad_in_a_row >= cfg.train.nonfinite_patience:
        ckpt.wait()
        repeat = f' ({bad_in_a_row} in a row)' if cfg.train.on_nonfinite == 'skip' else ''
        raise TrainingError(
          f'{what}{repeat} and training stopped; last good checkpoint: step '
          f'{ckpt.latest_step()} in {ckpt.directory}'
        )
      logging.warning(
        '%s; its batch is skipped (%d in a row, train.nonfinite_patience=%d)',
        what,
        bad_in_a_row,
        cfg.train.nonfinite_patience,
      )
      return
    bad_in_a_row = 0
    logger.add(metrics)
    if done_step % cfg.train.log_every == 0 or done_step == end:
      record = logger.write(done_step)
    if cfg.eval.every_steps and done_step % cfg.eval.every_steps == 0:
      # Metrics are read one step late: `state` is already the state after step `step`.
      result = eval_lib.evaluate_model(fns, state, heldout_tokens, cfg, tokenizer, eval_step)
      logger.record(step, {'step': step, **{f'eval_{k}': v for k, v in result.items()}})
      logger.restart_clock()

  try:
    while step < end and not preemption.requested:
      batch = pipeline.make_global_batch(next(data_iter), fns.batch_sharding)
      if step == start:
        logging.info(
          'compiling the train step (%s devices, mesh %s) ...', jax.device_count(), dict(mesh.shape)
        )
        compile_start = time.perf_counter()
      state, metrics = fns.train_step(state, batch)  # the first call traces and compiles
      if step == start:
        logging.info('compiled in %.1f s', time.perf_counter() - compile_start)
      step += 1
      if pending is not None:
        consume(*pending)
      elif step == start + 1:
        jax.block_until_ready(metrics)
        logger.restart_clock()  # the first step compiles; keep it out of throughput
      pending = (step, metrics)
      if step % cfg.checkpoint.every_steps == 0:
        ckpt.save(step, state, data_iter)
        saved = step
    if pending is not None:
      consume(*pending)
    if saved != step:
      ckpt.save(step, state, data_iter)
    if preemption.requested:
      logging.warning(
        '%s: wrote checkpoint at step %d; exiting cleanly', preemption.requested, step
      )
    ckpt.close()
  finally:
    preemption.restore()
    logger.close()
    try:  # a save still in flight when an error stops the loop is complete and good: finish it
      ckpt.wait()
    except Exception:  # pylint: disable=broad-except  (its own failure; the older steps stand)
      logging.warning('the checkpoint in flight did not complete')
  if preemption.requested == 'SIGINT':
    raise Interrupted(
      f'interrupted (Ctrl-C): checkpoint written at step {step} in '
      f'{ckpt.directory}; rerun the same command to resume'
    )
  return record


def _has_checkpoint(workdir: str, cfg: schema.Config) -> bool:
  if not storage.isdir(storage.join(workdir, 'checkpoints')):
    return False
  return bool(Checkpointer(workdir, cfg.checkpoint, read_only=True).all_steps())


def _restore_newest(ckpt: Checkpointer, fns, data_iter) -> tuple[int | None, dict | None]:
  """(step, state) of the newest checkpoint that restores (the data iterator with it), or
  (None, None) without checkpoints. A step that fails to restore in any process is moved aside
  with a warning and every process tries the next older one; when none restores, the run stops
  with one line."""
  steps = ckpt.all_steps()
  for step in reversed(steps):
    state, error = None, ckpt.damage(step)  # the same answer in every process
    if error is None:
      try:
        state = _restore(ckpt, step, fns, data_iter)
      except Exception as e:  # pylint: disable=broad-except  (any damage: missing, truncated, ...)
        error = f'{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ""}'
    if distributed.all_processes(error is None):
      return step, state
    aside = ckpt.move_aside(step)
    logging.warning(
      'checkpoint step %d does not restore (%s); moved to %s, trying the next older one',
      step,
      error or 'in another process',
      aside,
    )
  if steps:
    raise TrainingError(
      f'none of the checkpoints {steps} in {ckpt.directory} restores (moved '
      f'aside to {ckpt.quarantine}); remove them to start afresh'
    )
  return None, None


def _restore(ckpt: Checkpointer, step: int, fns, data_iter) -> dict:
  if ckpt.data_process_count(step) == jax.process_count():
    logging.info('Resuming from checkpoint step %d in %s', step, ckpt.directory)
    return ckpt.restore(step, fns.abstract_state(), data_iter)
  # written by another number of processes, or weights only (eval.import_hf, uoe_from_dense):
  # the same global stream, positioned by step
  writers = ckpt.data_process_count(step)
  logging.info(
    'Resuming from checkpoint step %d in %s, %s',
    step,
    ckpt.directory,
    'weights only (no data position)'
    if writers is None
    else f'written by {writers} processes, on {jax.process_count()}',
  )
  pipeline.seek(data_iter, step)
  return ckpt.restore(step, fns.abstract_state())


def _fail(message: str) -> None:
  """One-line error on stderr and exit 1; other processes of the run can read it."""
  distributed.report_error(message)
  if jax.process_count() > 1:  # each process's log names its own error
    logging.error('%s', message)
  print(f'error: {message}', file=sys.stderr)
  sys.exit(1)


def main(argv, flag):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  try:
    distributed.initialize(
      flag['coordinator_address'].value,
      flag['num_processes'].value,
      flag['process_id'].value,
      flag['heartbeat_timeout'].value,
    )
  except ValueError as e:
    _fail(str(e))
  if jax.process_index() != 0:
    logging.set_verbosity(logging.WARNING)  # the primary process logs the run
  try:
    cfg = schema.load(cli.config_value(flag['config']), jax.device_count())
    train_and_evaluate(cfg, flag['workdir'].value)
  except Interrupted as e:
    print(str(e), file=sys.stderr)
    sys.exit(130)  # 128 + SIGINT: a shell or scheduler sees the run was interrupted
  except (ConfigError, TrainingError, WorkdirLocked, corpus.DataError) as e:
    _fail(str(e))
  except OSError as e:  # disk full, read-only or vanished storage: one line, checkpoints intact
    _fail(describe_os_error(e, flag['workdir'].value))
  except Exception as e:  # pylint: disable=broad-except
    cause = os_error_in(e)  # e.g. a background checkpoint write that hit a full disk
    if cause is not None:
      _fail(describe_os_error(cause, flag['workdir'].value))
    # In a multi-process run a peer's failure surfaces here as a collective or barrier error:
    # name the process that failed first, with its own message.
    causes = distributed.peer_errors()
    if not causes:
      distributed.report_error(f'{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ""}')
      raise
    _fail(f'stopped because {causes[0]} (here: {type(e).__name__})')


def run():
  # Flags are defined here, not at import, so train/eval modules can be imported together.
  flag = {
    'config': config_flags.DEFINE_config_file(
      'config', None, 'Experiment config file.', lock_config=True
    ),
    'workdir': flags.DEFINE_string(
      'workdir', None, 'Run directory (checkpoints, logs, config.json).'
    ),
    'coordinator_address': flags.DEFINE_string(
      'coordinator_address',
      '',
      'Multi-process: host:port of process 0 (or '
      '$ROUTED_COORDINATOR_ADDRESS; detected on TPU pod slices and SLURM).',
    ),
    'num_processes': flags.DEFINE_integer(
      'num_processes', 0, 'Multi-process: number of processes ($ROUTED_NUM_PROCESSES).'
    ),
    'process_id': flags.DEFINE_integer(
      'process_id', -1, 'Multi-process: index of this process ($ROUTED_PROCESS_ID).'
    ),
    'heartbeat_timeout': flags.DEFINE_integer(
      'heartbeat_timeout',
      100,
      'Multi-process: seconds without a heartbeat after which '
      'the coordination service declares a process dead and stops the others.',
    ),
  }
  flags.mark_flags_as_required(['config', 'workdir'])
  app.run(lambda argv: main(argv, flag), flags_parser=cli.parse_flags)


if __name__ == '__main__':
  run()
