"""`python -m eval.sample --workdir=DIR --prompt=TEXT [--max_new_tokens=N] [--temperature=T]
[--top_k=K] [--top_p=P] [--seed=S] [--step=N]`.

Restores a checkpoint like eval/evaluate.py (config from DIR/config.json, model state only) and
samples a continuation of the prompt; the same seed gives the same ids, for every model type.
Prints the continuation, then one JSON line last.

Decoding re-runs the whole prefix at every step (no KV cache). When no future position can reach
an earlier logit (dense attention with dense, top-k dropless, loss-free or ERC MoE, entropy
trigger), a fixed buffer of length prompt + max_new_tokens is exact and compiles once. Otherwise
(`needs_exact_prefix`) padding would change the earlier logits, so the exact prefix is re-run at
each length, one compilation per generated token:
- selection that reads the whole sequence: routing attention's clusters
  (docs/routing_attention.md), UoE's per-head/expert token selection (docs/uoe.md), expert-choice
  MoE (each expert takes its top-C tokens of the sequence, docs/moe.md);
- capacity execution (`moe.execution='capacity'`): C slots per expert and sequence grow with the
  length, and padding's first choices take slots before the prompt's second choices;
- router jitter (`moe.jitter > 0`, also on at evaluation): its noise is drawn for the whole shape.
With the exact prefix such a model sees a short sequence (fewer slots, clusters over the prefix),
not the training length.
"""

import functools
import json
import sys

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from flax import nnx

from configs import cli, schema
from data.tokenizer import get_tokenizer
from eval import evaluate
from model.config import ConfigError


def filter_logits(logits_V: jax.Array, *, temperature: float, top_k: int, top_p: float) -> jax.Array:
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


@functools.partial(jax.jit, static_argnames=('graphdef', 'vocab_size', 'temperature', 'top_k',
                                             'top_p'))
def _next_token(state, tokens_1L, last, key, *, graphdef, vocab_size: int, temperature: float,
                top_k: int, top_p: float) -> jax.Array:
  """The id drawn after position `last`; compiled once per model, settings and length."""
  logits, _ = nnx.merge(graphdef, state)(tokens_1L)
  logits_V = jnp.where(jnp.arange(logits.shape[-1]) < vocab_size, logits[0, last], -jnp.inf)
  if temperature == 0:
    return jnp.argmax(logits_V)
  logits_V = filter_logits(logits_V, temperature=temperature, top_k=top_k, top_p=top_p)
  return jax.random.categorical(key, logits_V)


def sample(model, prompt_ids, *, max_new_tokens: int, vocab_size: int, temperature: float = 1.0,
           top_k: int = 0, top_p: float = 1.0, seed: int = 0, exact_prefix: bool = True,
           eos_id: int | None = None) -> list[int]:
  """Appends up to `max_new_tokens` sampled ids to `prompt_ids`; temperature 0 is greedy.

  Only ids < `vocab_size` (the tokenizer's) are ever drawn. `exact_prefix=False` runs a fixed
  buffer instead of the exact prefix: exact only when `needs_exact_prefix` is False.
  """
  if len(prompt_ids) == 0:
    raise ValueError('prompt_ids is empty: sampling needs at least one token to continue')
  graphdef, state = nnx.split(model)
  settings = dict(graphdef=graphdef, vocab_size=vocab_size, temperature=float(temperature),
                  top_k=int(top_k), top_p=float(top_p))
  ids = [int(i) for i in prompt_ids]
  total = len(ids) + max_new_tokens
  key = jax.random.key(seed)
  for t in range(max_new_tokens):
    n = len(ids)
    tokens = ids if exact_prefix else ids + [0] * (total - n)
    tok = int(_next_token(state, jnp.asarray([tokens], jnp.int32), n - 1,
                          jax.random.fold_in(key, t), **settings))
    ids.append(tok)
    if eos_id is not None and tok == eos_id:
      break
  return ids


def needs_exact_prefix(cfg: schema.Config) -> bool:
  """Whether padding a prefix would change its logits (see the module docstring): some layer's
  selection reads the whole sequence (routing attention, UoE SMHA, UoME data selection, expert
  choice), or a MoE layer runs with capacity slots or router jitter."""
  u, m = cfg.uoe, cfg.moe
  reads_future = (cfg.attention.kind != 'dense' or u.attention == 'smha' or
                  (u.feed_forward == 'uome' and u.paradigm == 'data_selection'))
  moe_length_dependent = m.num_experts > 0 and (
      m.router == 'expert_choice' or m.execution == 'capacity' or m.jitter > 0)
  return reads_future or moe_length_dependent


def sample_checkpoint(workdir: str, prompt: str, *, step: int | None = None,
                      max_new_tokens: int = 64, temperature: float = 1.0, top_k: int = 0,
                      top_p: float = 1.0, seed: int = 0) -> dict:
  """{'step', 'prompt', 'completion', 'tokens', 'seed'}: a continuation of `prompt` sampled from a
  run's checkpoint (default: the newest) on one device."""
  cfg, step, model = evaluate.restore_on_one_device(workdir, step)
  tokenizer = get_tokenizer(cfg.data.tokenizer)
  prompt_ids = tokenizer.encode(prompt)
  if len(prompt_ids) == 0:
    raise ConfigError('--prompt is empty: give at least one character')
  ids = sample(model, prompt_ids, max_new_tokens=max_new_tokens,
               vocab_size=tokenizer.vocab_size, temperature=temperature, top_k=top_k,
               top_p=top_p, seed=seed, exact_prefix=needs_exact_prefix(cfg),
               eos_id=tokenizer.eos_id)
  new = ids[len(prompt_ids):]
  return {'step': step, 'prompt': prompt, 'completion': tokenizer.decode(np.asarray(new)),
          'tokens': new, 'seed': seed}


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  f = flags.FLAGS
  try:
    result = sample_checkpoint(f.workdir, f.prompt, step=f.step, max_new_tokens=f.max_new_tokens,
                               temperature=f.temperature, top_k=f.top_k, top_p=f.top_p,
                               seed=f.seed)
  except ConfigError as e:
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
