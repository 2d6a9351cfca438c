"""Held-out evaluation: the jitted eval step, a model's held-out numbers, a checkpoint's.

Shared by in-training evaluation (`train.train`, `eval.every_steps`), sweeps (`train.sweep`) and
`python -m eval.evaluate`. Numbers are honest for every model (docs/causality.md): a causal model
is scored teacher-forced, one whose logits at t can read tokens after t exact-prefix.
"""

import collections
import dataclasses
import functools
import math
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging
from flax import nnx
from jax.experimental import multihost_utils

from configs import schema, sharding
from data import corpus, pipeline, storage
from data.tokenizer import get_tokenizer
from model import erc, plan
from model.config import ConfigError
from model.moe_layer import MoE
from train import mesh as mesh_lib
from train.restore import check_same_tokenizer, read_run_config, restore_model
from train.step import StepFns, make_step_fns


def eval_model(model_def: nnx.GraphDef, model_state) -> nnx.Module:
  """The model of `model_state` in evaluation mode (no router jitter)."""
  model = nnx.merge(model_def, model_state)
  model.eval()
  return model


def eval_step(model_state, batch: dict, *, model_def: nnx.GraphDef, tokenizer) -> dict:
  """Sums over `batch` and values at chosen positions of the model, in evaluation mode.

  `batch`: 'inputs', 'targets' [B, L], 'cuts' (int32 [B, P]: positions whose cross-entropy is
  returned) and, for exact-prefix rows, 'segment_ids' (1 up to the row's scored position, 0
  after: the model sees that prefix alone, `model.validity`). Returns 'ce', 'tokens', 'bytes'
  (sums over every position) and 'ce_BP', 'bytes_BP' (at the cuts). Jit it with `make_eval_step`.
  """
  logits, _ = eval_model(model_def, model_state)(
    batch['inputs'], segment_ids_BL=batch.get('segment_ids')
  )
  ce_BL = optax.softmax_cross_entropy_with_integer_labels(
    logits.astype(jnp.float32), batch['targets']
  )
  bytes_BL = (
    tokenizer.bytes_per_token(batch['targets']).astype(jnp.float32)
    if tokenizer.byte_level
    else jnp.zeros_like(ce_BL)
  )
  at = lambda x_BL: jnp.take_along_axis(x_BL, batch['cuts'], axis=1)
  return {
    'ce': ce_BL.sum(),
    'tokens': jnp.float32(ce_BL.size),
    'bytes': bytes_BL.sum(),
    'ce_BP': at(ce_BL),
    'bytes_BP': at(bytes_BL),
  }


def make_eval_step(fns: StepFns, tokenizer):
  """`eval_step` jitted for the run of `fns`: (model_state, batch) -> its dict. Build it once per
  run and pass it to `evaluate_model`: each new jit object compiles anew."""
  return jax.jit(
    functools.partial(eval_step, model_def=fns.model_def, tokenizer=tokenizer),
    in_shardings=(fns.state_shardings['model'], fns.batch_sharding),
  )


def sampled_positions(inputs_BL: np.ndarray, count: int) -> np.ndarray:
  """[B, count] distinct positions per window, drawn uniformly and deterministically from the
  window's own tokens (the same windows get the same positions in every run and checkpoint)."""
  length = inputs_BL.shape[1]
  count = min(count, length)
  return np.stack(
    [
      np.sort(np.random.default_rng(zlib.crc32(row.tobytes())).choice(length, count, replace=False))
      for row in inputs_BL
    ]
  ).astype(np.int32)


def _gathered(x) -> np.ndarray:
  """A (possibly multi-process) global array as one numpy array on every process."""
  return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def evaluate_model(
  fns: StepFns,
  state: dict,
  tokens: np.ndarray,
  cfg: schema.Config,
  tokenizer=None,
  step_fn=None,
  positions_per_window: int | None = None,
) -> dict:
  """Held-out loss, perplexity, token count and bits per byte of `state['model']`, honestly.

  A causal model (`model.plan`: `ModelPlan.causal`) is scored teacher-forced: every position of every
  window, exactly what it would predict from its prefix. A model that reads the future is scored
  exact-prefix: `positions_per_window` positions per window (default `eval.positions_per_window`),
  each predicted from its prefix alone through the validity mask (one forward pass each, one
  compilation), with the standard error of the mean over positions. Beside it: the teacher-forced
  numbers (which let position t use tokens after t), never as `loss`, and the paired size of the
  leak at the same positions (`future_leak`: exact-prefix minus teacher-forced, with its error).
  `tokenizer` is the dataset's (default: `data.tokenizer`); bits per byte need a byte-level one.
  """
  tokenizer = tokenizer or get_tokenizer(cfg.data.tokenizer)
  step_fn = step_fn or make_eval_step(fns, tokenizer)
  causal = plan.build(cfg.model).causal
  per_window = (
    cfg.eval.positions_per_window if positions_per_window is None else positions_per_window
  )
  if per_window < 1:
    raise ConfigError(f'positions_per_window={per_window}: expected >= 1')
  tf = collections.Counter()
  exact, forced, nbytes = [], [], []  # per scored position
  for batch in pipeline.eval_batches(
    tokens,
    seq_len=cfg.train.seq_len,
    batch_size=cfg.eval.batch_size,
    max_batches=cfg.eval.max_batches,
    process_index=jax.process_index(),
    process_count=jax.process_count(),
  ):
    l = batch['inputs'].shape[1]
    cuts_BP = sampled_positions(batch['inputs'], 1 if causal else per_window)
    out = step_fn(
      state['model'], pipeline.make_global_batch({**batch, 'cuts': cuts_BP}, fns.batch_sharding)
    )
    tf.update({k: float(out[k]) for k in ('ce', 'tokens', 'bytes')})
    if causal:
      continue
    forced.append(_gathered(out['ce_BP']))
    passes = []
    for cut_B1 in np.split(cuts_BP, cuts_BP.shape[1], axis=1):  # one pass per sampled position
      seg = (np.arange(l)[None, :] <= cut_B1).astype(np.int32)
      out = step_fn(
        state['model'],
        pipeline.make_global_batch(
          {**batch, 'cuts': cut_B1, 'segment_ids': seg}, fns.batch_sharding
        ),
      )
      passes.append((_gathered(out['ce_BP']), _gathered(out['bytes_BP'])))
    exact.append(np.concatenate([ce for ce, _ in passes], axis=1))
    nbytes.append(np.concatenate([b for _, b in passes], axis=1))
  if tf['tokens'] == 0:
    raise corpus.DataError(
      f'held-out split has fewer than {cfg.train.seq_len + 1} tokens; nothing to evaluate'
    )
  teacher_forced = _summary(tf['ce'], tf['tokens'], tf['bytes'], tokenizer)
  if causal:
    return {**teacher_forced, 'causal': True, 'evaluation': 'teacher_forced (exact: causal model)'}
  exact, forced, nbytes = (
    np.concatenate(x).reshape(-1).astype(np.float64) for x in (exact, forced, nbytes)
  )
  stderr = lambda x: float(np.std(x, ddof=1) / np.sqrt(x.size)) if x.size > 1 else float('nan')
  out = {
    **_summary(exact.sum(), exact.size, nbytes.sum(), tokenizer),
    'loss_stderr': stderr(exact),
    'causal': False,
    'evaluation': f'exact_prefix ({per_window} positions per window)',
    'positions_per_window': per_window,
  }
  out.update({f'teacher_forced_{k}': v for k, v in teacher_forced.items()})
  out['teacher_forced_sampled_loss'] = float(forced.mean())  # same positions, future visible
  out['future_leak'] = float((exact - forced).mean())
  out['future_leak_stderr'] = stderr(exact - forced)
  out.update(paired_estimate(out))
  return out


def paired_estimate(result: dict) -> dict:
  """The exact-prefix loss over every position, estimated as the teacher-forced loss over every
  position plus the leak measured at the sampled positions (a control variate: unbiased like
  `loss`, and its error is only that of the leak, far below `loss_stderr` when the leak is
  steady). `paired_loss`, `paired_loss_stderr` and, byte-level, `paired_bits_per_byte`."""
  loss = result['teacher_forced_loss'] + result['future_leak']
  out = {'paired_loss': loss, 'paired_loss_stderr': result['future_leak_stderr']}
  if 'teacher_forced_bits_per_byte' in result:
    out['paired_bits_per_byte'] = (
      result['teacher_forced_bits_per_byte'] * loss / result['teacher_forced_loss']
    )
  return out


def _summary(ce_sum: float, count: float, num_bytes: float, tokenizer) -> dict:
  loss = ce_sum / count
  out = {'loss': loss, 'perplexity': math.exp(min(loss, 700.0)), 'tokens': int(count)}
  if tokenizer.byte_level and num_bytes:
    out['bits_per_byte'] = ce_sum / math.log(2) / num_bytes
  return out


def _eval_config(cfg: schema.Config) -> tuple[schema.Config, int]:
  """The run's config and device count; data-parallel over the devices here if its mesh does not fit."""
  try:
    schema.validate(cfg, jax.device_count())
    return cfg, jax.device_count()
  except ConfigError as e:
    n = jax.device_count()
    while cfg.eval.batch_size % n:
      n -= 1
    logging.info(
      'training mesh does not fit here (%s); evaluating data-parallel on %d devices', e, n
    )
    return dataclasses.replace(cfg, mesh=schema.MeshConfig(shape=(n, 1, 1, 1), rules='dp')), n


def coupling_levels(model) -> dict[str, float]:
  """ERC coupling level alpha* of every MoE layer, from the weights (any MoE model, ERC or not)."""
  out = {}
  for stage in model.stages:
    if stage.scan:
      if not isinstance(stage.blocks.mlp, MoE):
        continue
      mlp = stage.blocks.mlp
      levels = jax.vmap(erc.coupling_level)(mlp.router[...], mlp.w_gate[...])
    else:
      if not isinstance(stage.blocks[0].mlp, MoE):
        continue
      levels = [erc.coupling_level(b.mlp.router[...], b.mlp.w_gate[...]) for b in stage.blocks]
    for i, level in enumerate(levels):
      out[f'layer_{stage.first + i}/moe/coupling_level'] = float(level)
  return out


def evaluate_checkpoint(
  workdir: str,
  step: int | None = None,
  data: str | None = None,
  baseline: bool = False,
  positions_per_window: int | None = None,
) -> dict:
  """The held-out numbers of a run's checkpoint (default: the newest) on its own dataset or the
  prepared dataset `data` (same tokenizer), written to DIR/eval/step_N.json; `baseline` adds the
  untrained model's as `init_*` (`python -m eval.evaluate`)."""
  if positions_per_window is not None and positions_per_window < 1:
    raise ConfigError(f'--positions_per_window={positions_per_window}: expected >= 1')
  cfg = read_run_config(workdir)
  if data is not None:
    data_cfg = dataclasses.replace(cfg.data, path=data)
    check_same_tokenizer(workdir, cfg.data, corpus.resolve_dataset(data_cfg))  # before any work
    cfg = dataclasses.replace(cfg, data=data_cfg)
  cfg, num_devices = _eval_config(cfg)
  restored = restore_model(workdir, step, mesh=cfg.mesh)
  mesh = mesh_lib.make_mesh(cfg.mesh, jax.devices()[:num_devices])
  fns = make_step_fns(cfg, mesh, sharding.rules(cfg.mesh.rules))
  dataset_dir = corpus.resolve_dataset(cfg.data)
  corpus.check_vocab(dataset_dir, cfg.model.vocab_size)
  tokens = corpus.load_split(dataset_dir, 'heldout')
  tokenizer = corpus.dataset_tokenizer(dataset_dir)
  step_fn = make_eval_step(fns, tokenizer)
  result = {
    'step': restored.step,
    **evaluate_model(
      fns,
      {'model': nnx.state(restored.model)},
      tokens,
      cfg,
      tokenizer,
      step_fn,
      positions_per_window,
    ),
    **coupling_levels(restored.model),
  }
  if baseline:
    init = evaluate_model(fns, fns.init(), tokens, cfg, tokenizer, step_fn, positions_per_window)
    result.update({f'init_{k}': v for k, v in init.items() if k != 'tokens'})
  if jax.process_index() == 0:
    storage.write_json(
      storage.join(workdir, 'eval', f'step_{restored.step}.json'), result, indent=2
    )
  return result
