"""`python -m eval.causality --config=SPEC [--workdir=DIR] [--seed=S]`: is the model causal, and do
packed documents stay apart? Measured, not assumed.

On a random model of the config (weights N(0, scale²), so routing decisions are decisive) or on a
run's checkpoint (`--workdir`), in evaluation mode, prints one JSON line:
- `causal`: what the layer kinds declare (the layer plan, `model.plan`), with `reasons`;
- `future_change`: max |Δlogit| at positions <= t when every token after t changes (several t);
- `prefix_padding_change`: max |Δlogit| between a prefix padded with segment id 0 and the same
  prefix run alone (the validity-mask contract of `model.validity`; must be ~0 for every model);
- `cross_document_change`: max |Δlogit| inside one packed document when the other document of the
  row changes (both directions);
- `packing`: "ok" when the config accepts `data.packing=True`, "refused" when it refuses it.
Exits 1 when the measurement contradicts the declaration: a causal model whose logits move with
the future (or a non-causal one whose do not), a padded prefix that differs from the prefix alone,
or a packing-accepting model whose documents influence each other.
"""

import json
import sys
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from flax import nnx
from ml_collections import config_flags

from configs import cli, schema
from model import plan, transformer
from model.config import ConfigError, ModelConfig

TOLERANCE = 1e-4  # relative to the largest |logit|: f32 rounding is far below, any real leak above


class Verdict(NamedTuple):
  """The JSON record of one check and the contradictions found (empty: the declaration holds)."""

  record: dict
  problems: list[str]


def random_model(cfg: ModelConfig, *, scale: float = 0.3, seed: int = 0) -> transformer.Transformer:
  """The Transformer of `cfg` with N(0, scale²) weights and routing state (numpy random numbers:
  no eager initialisation, which is slow on small machines)."""
  model = nnx.eval_shape(lambda: transformer.Transformer(cfg, rngs=nnx.Rngs(0)))
  state = nnx.state(model)
  rng = np.random.default_rng(seed)
  pure = jax.tree.map(
    lambda a: jnp.asarray(scale * rng.standard_normal(a.shape), a.dtype), nnx.to_pure_dict(state)
  )
  nnx.replace_by_pure_dict(state, pure)
  nnx.update(model, state)
  return model


def _logits_fn(model):
  """Jitted (tokens, positions, segment_ids) -> f32 logits of `model` in evaluation mode."""
  model.eval()
  graphdef, state = nnx.split(model)

  @jax.jit
  def fn(state, tokens_BL, positions_BL, segment_ids_BL):
    return nnx.merge(graphdef, state)(
      tokens_BL, positions_BL=positions_BL, segment_ids_BL=segment_ids_BL
    )[0]

  return lambda *args: np.asarray(fn(state, *args))


def measure(model, *, length: int, vocab: int, seed: int = 0) -> dict:
  """The three measurements of the module docstring on `model` at sequence `length`."""
  rng = np.random.default_rng(seed)
  fresh = lambda n: rng.integers(0, vocab, size=n)
  cuts = sorted({max(1, length // 4 + 1), max(1, length // 2 - 3), max(1, 3 * length // 4 + 2)})
  cuts = [t for t in cuts if t < length - 1]
  base_L = fresh(length)
  arange_L = np.arange(length)
  rows, positions, segments = [], [], []

  def add(tokens_L, segment_ids_L, positions_L=arange_L):
    rows.append(tokens_L)
    segments.append(segment_ids_L)
    positions.append(positions_L)
    return len(rows) - 1

  everywhere = np.ones(length, np.int32)
  base = add(base_L, everywhere)
  futures = []
  for t in cuts:  # tokens > t replaced; positions <= t compared
    changed_L = base_L.copy()
    changed_L[t + 1 :] = fresh(length - t - 1)
    futures.append((t, add(changed_L, everywhere)))
  prefix = cuts[len(cuts) // 2] + 1  # prefix of `prefix` tokens, padded with segment id 0
  padded = add(base_L, (arange_L < prefix).astype(np.int32))
  split = length // 2 + 1  # two packed documents: [0, split) and [split, L)
  doc_segments = np.where(arange_L < split, 1, 2).astype(np.int32)
  doc_positions = np.where(arange_L < split, arange_L, arange_L - split)
  docs = add(base_L, doc_segments, doc_positions)
  first_changed, second_changed = base_L.copy(), base_L.copy()
  first_changed[:split] = fresh(split)
  second_changed[split:] = fresh(length - split)
  doc_first = add(first_changed, doc_segments, doc_positions)
  doc_second = add(second_changed, doc_segments, doc_positions)

  logits = _logits_fn(model)
  as_array = lambda xs: jnp.asarray(np.stack(xs), jnp.int32)
  out = logits(as_array(rows), as_array(positions), as_array(segments))
  alone = logits(as_array([base_L[:prefix]]), as_array([arange_L[:prefix]]), None)[0]
  diff = lambda a, b: float(np.max(np.abs(a - b))) if a.size else 0.0
  return {
    'future_change': max(diff(out[base, : t + 1], out[row, : t + 1]) for t, row in futures),
    'prefix_padding_change': diff(out[padded, :prefix], alone),
    'cross_document_change': max(
      diff(out[docs, split:], out[doc_first, split:]),
      diff(out[docs, :split], out[doc_second, :split]),
    ),
    'logit_scale': float(np.max(np.abs(out[base]))),
  }


def check(cfg: schema.Config, model, *, seed: int = 0, name: str = '') -> Verdict:
  """The measurements of `model` (the model of `cfg`) against what its layer kinds declare."""
  reasons = plan.build(cfg.model).reasons
  m = measure(model, length=cfg.train.seq_len, vocab=cfg.model.vocab_size, seed=seed)
  tol = TOLERANCE * max(m.pop('logit_scale'), 1.0)
  causal = not reasons
  record = {
    'config': name,
    'causal': causal,
    'reasons': reasons,
    **m,
    'packing': 'refused' if reasons else 'ok',
    'tolerance': tol,
  }
  problems = []
  if causal and m['future_change'] > tol:
    problems.append(
      f'declared causal, but logits at <= t moved by {m["future_change"]:.3g} when '
      'tokens after t changed'
    )
  if not causal and m['future_change'] <= tol:
    problems.append(
      f'declared non-causal ({reasons[0]}), but no logit at <= t moved when tokens after t changed'
    )
  if m['prefix_padding_change'] > tol:
    problems.append(
      f'a prefix padded with segment id 0 differs from the prefix alone by '
      f'{m["prefix_padding_change"]:.3g}'
    )
  if not reasons and m['cross_document_change'] > tol:
    problems.append(
      f"packing accepted, but one document moved another's logits by "
      f'{m["cross_document_change"]:.3g}'
    )
  return Verdict(record, problems)


def check_config(config, *, seed: int = 0, name: str = '') -> Verdict:
  """`check` on a random model of an experiment ConfigDict (its packing flag is ignored)."""
  config.data.packing = False  # measured here; schema.load would refuse it for a non-causal model
  cfg = schema.load(config, jax.device_count())
  return check(cfg, random_model(cfg.model, seed=seed), seed=seed, name=name)


def check_checkpoint(workdir: str, seed: int = 0) -> Verdict:
  """`check` on the newest checkpoint of a run."""
  from eval import evaluate  # pylint: disable=g-import-not-at-top  (restores checkpoints)

  cfg, step, model = evaluate.restore_model(workdir)
  return check(cfg, model, seed=seed, name=f'{workdir} (step {step})')


def main(argv, config_flag):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  f = flags.FLAGS
  if not f.config and not f.workdir:
    print(
      'error: give --config=SPEC (a random model) or --workdir=DIR (a checkpoint)', file=sys.stderr
    )
    sys.exit(1)
  try:
    if f.workdir:
      record, problems = check_checkpoint(f.workdir, f.seed)
    else:
      record, problems = check_config(
        cli.config_value(config_flag),
        seed=f.seed,
        name=config_flags.get_config_filename(flags.FLAGS['config']),
      )
  except ConfigError as e:
    print(f'error: {e}', file=sys.stderr)
    sys.exit(1)
  print(json.dumps(record))
  if problems:
    print('error: ' + '; '.join(problems), file=sys.stderr)
    sys.exit(1)


def run():
  config_flag = config_flags.DEFINE_config_file(
    'config', None, 'Experiment config, e.g. configs/demo.py:tiny (a random model of it).'
  )
  flags.DEFINE_string('workdir', None, 'Run directory: measure its newest checkpoint instead.')
  flags.DEFINE_integer('seed', 0, 'Seed of the random weights and tokens.')
  app.run(lambda argv: main(argv, config_flag), flags_parser=cli.parse_flags)


if __name__ == '__main__':
  run()
