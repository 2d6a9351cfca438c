"""`python -m eval.sample --workdir=DIR --prompt=TEXT [--max_new_tokens=N] [--temperature=T]
[--top_k=K] [--top_p=P] [--seed=S] [--step=N]`.

Restores a checkpoint like eval/evaluate.py (config from DIR/config.json, model state only) and
samples a continuation of the prompt; the same seed gives the same ids, for every model type.
Prints the continuation, then one JSON line last. DIR may be local or gs://BUCKET/PATH.

Decoding runs one fixed buffer per call (no KV cache): the prompt and the tokens drawn so far,
padded to a length bucket (the next power of two >= prompt + max_new_tokens, at least 64), so one
compilation serves every step and every call of that bucket. A causal model ignores the padding.
A model that reads the future (`Transformer.causal` is False: routing attention, UoE at partial
capacity, expert choice, capacity execution) gets the validity mask (`model.validity`): padding has
segment id 0, so each step's logits are exactly those of the prefix run alone. Such a model sees a
prefix, not the training length (fewer capacity slots, clusters over the prefix); see
docs/causality.md. Router jitter is off (evaluation mode).
"""

import functools
import json
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from flax import nnx

from configs import cli
from data import corpus
from eval import evaluate
from model.config import ConfigError


def filter_logits(
  logits_V: jax.Array, *, temperature: float, top_k: int, top_p: float
) -> jax.Array:
  """Temperature, then top-k (0 = off), then nucleus top-p (1 = off); removed entries are -inf."""
  logits_V = logits_V.astype(jnp.float32) / max(temperature, 1e-6)
  if top_k > 0:
    kth = jax.lax.top_k(logits_V, min(top_k, logits_V.shape[-1]))[0][-1]
    logits_V = jnp.where(logits_V < kth, -jnp.inf, logits_V)
  if top_p < 1.0:
    order = jnp.argsort(-logits_V)
    probs = jax.nn.softmax(logits_V[order])
    keep_sorted = jnp.cumsum(probs) - probs < top_p  # keep the smallest set whose mass reaches p
    keep = jnp.zeros_like(keep_sorted).at[order].set(keep_sorted)
    logits_V = jnp.where(keep, logits_V, -jnp.inf)
  return logits_V


@functools.partial(
  jax.jit, static_argnames=('graphdef', 'vocab_size', 'temperature', 'top_k', 'top_p', 'masked')
)
def _next_token(
  state,
  tokens_1L,
  last,
  key,
  *,
  graphdef,
  vocab_size: int,
  temperature: float,
  top_k: int,
  top_p: float,
  masked: bool,
) -> jax.Array:
  """The id drawn after position `last`; compiled once per model, settings and buffer length.
  With `masked`, positions after `last` have segment id 0: invisible to every layer."""
  model = nnx.merge(graphdef, state)
  model.eval()
  segment_ids = None
  if masked:
    segment_ids = (jnp.arange(tokens_1L.shape[1]) <= last).astype(jnp.int32)[None]
  logits, _ = model(tokens_1L, segment_ids_BL=segment_ids)
  logits_V = jnp.where(jnp.arange(logits.shape[-1]) < vocab_size, logits[0, last], -jnp.inf)
  if temperature == 0:
    return jnp.argmax(logits_V)
  logits_V = filter_logits(logits_V, temperature=temperature, top_k=top_k, top_p=top_p)
  return jax.random.categorical(key, logits_V)


def bucket(length: int) -> int:
  """Buffer length for `length` tokens: the next power of two, at least 64."""
  return max(64, 1 << (length - 1).bit_length())


def sample(
  model,
  prompt_ids,
  *,
  max_new_tokens: int,
  vocab_size: int,
  temperature: float = 1.0,
  top_k: int = 0,
  top_p: float = 1.0,
  seed: int = 0,
  eos_id: int | None = None,
  progress_every: int = 0,
) -> list[int]:
  """Appends up to `max_new_tokens` sampled ids to `prompt_ids`; temperature 0 is greedy.

  Only ids < `vocab_size` (the tokenizer's) are ever drawn. Every step runs one buffer of
  `bucket(len(prompt) + max_new_tokens)` tokens, masked when the model is not causal (module
  docstring). `progress_every` > 0 prints a progress line to stderr every that many tokens.
  """
  if len(prompt_ids) == 0:
    raise ValueError('prompt_ids is empty: sampling needs at least one token to continue')
  graphdef, state = nnx.split(model)
  settings = dict(
    graphdef=graphdef,
    vocab_size=vocab_size,
    temperature=float(temperature),
    top_k=int(top_k),
    top_p=float(top_p),
    masked=not model.causal,
  )
  ids = [int(i) for i in prompt_ids]
  buffer = np.zeros(bucket(len(ids) + max_new_tokens), np.int32)
  buffer[: len(ids)] = ids
  key = jax.random.key(seed)
  start = time.perf_counter()
  for t in range(max_new_tokens):
    n = len(ids)
    tok = int(
      _next_token(state, jnp.asarray(buffer[None]), n - 1, jax.random.fold_in(key, t), **settings)
    )
    ids.append(tok)
    buffer[n] = tok
    if progress_every and (t + 1) % progress_every == 0:
      print(
        f'sampled {t + 1}/{max_new_tokens} tokens ({time.perf_counter() - start:.1f} s)',
        file=sys.stderr,
        flush=True,
      )
    if eos_id is not None and tok == eos_id:
      break
  return ids


def sample_checkpoint(
  workdir: str,
  prompt: str,
  *,
  step: int | None = None,
  max_new_tokens: int = 64,
  temperature: float = 1.0,
  top_k: int = 0,
  top_p: float = 1.0,
  seed: int = 0,
) -> dict:
  """{'step', 'prompt', 'completion', 'tokens', 'seed'}: a continuation of `prompt` sampled from a
  run's checkpoint (default: the newest) on one device."""
  # The run's dataset's tokenizer (not data.tokenizer, which a prepared dataset overrides),
  # checked with the prompt before the model is restored.
  tokenizer = evaluate.run_tokenizer(workdir, evaluate.read_run_config(workdir).data)
  prompt_ids = tokenizer.encode(prompt)
  if len(prompt_ids) == 0:
    raise ConfigError('--prompt is empty: give at least one character')
  restored = evaluate.restore_model(workdir, step)
  ids = sample(
    restored.model,
    prompt_ids,
    max_new_tokens=max_new_tokens,
    vocab_size=tokenizer.vocab_size,
    temperature=temperature,
    top_k=top_k,
    top_p=top_p,
    seed=seed,
    eos_id=tokenizer.eos_id,
    progress_every=50 if max_new_tokens >= 100 else 0,
  )
  new = ids[len(prompt_ids) :]
  return {
    'step': restored.step,
    'prompt': prompt,
    'completion': tokenizer.decode(np.asarray(new)),
    'tokens': new,
    'seed': seed,
  }


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  f = flags.FLAGS
  try:
    result = sample_checkpoint(
      f.workdir,
      f.prompt,
      step=f.step,
      max_new_tokens=f.max_new_tokens,
      temperature=f.temperature,
      top_k=f.top_k,
      top_p=f.top_p,
      seed=f.seed,
    )
  except (ConfigError, corpus.DataError) as e:
    print(f'error: {e}', file=sys.stderr)
    sys.exit(1)
  print(result['prompt'] + result['completion'])
  print(json.dumps(result))


def run():
  flags.DEFINE_string('workdir', None, 'Run directory written by train.train.')
  flags.DEFINE_string('prompt', None, 'Text to continue.')
  flags.DEFINE_integer('step', None, 'Checkpoint step; default: the newest.')
  flags.DEFINE_integer('max_new_tokens', 64, 'Tokens to sample (fewer if EOS is drawn).')
  flags.DEFINE_float('temperature', 1.0, 'Softmax temperature; 0 = greedy.')
  flags.DEFINE_integer('top_k', 0, 'Sample among the k most likely tokens; 0 = all.')
  flags.DEFINE_float('top_p', 1.0, 'Nucleus sampling mass; 1 = off.')
  flags.DEFINE_integer('seed', 0, 'Sampling seed.')
  flags.mark_flags_as_required(['workdir', 'prompt'])
  app.run(main, flags_parser=cli.parse_flags)


if __name__ == '__main__':
  run()
