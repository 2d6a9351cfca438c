"""The chunked causal attention (`attention.impl='chunked'`, CPU's 'auto') against the 'xla'
reference: outputs and gradients, grouped heads, packed segments, ragged last chunks, bf16, and a
whole model's loss and gradients."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import configs.schema
import configs.tiny
from model import chunked_attention, flash
from model.attention import causal_attention
from model.transformer import Transformer


def normal(shape, seed, dtype=jnp.float32):
  return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), dtype)


def attention_and_grads(impl, q, k, v, seg, chunk=None):
  """Output and d(Σ out·w)/d(q, k, v) through `impl` ('xla' reference or a chunk size)."""
  w = normal(q.shape, 9, q.dtype)

  def out(q, k, v):
    if impl == 'xla':
      return causal_attention(q, k, v, segment_ids_BL=seg, impl='xla')
    return chunked_attention.causal_attention(q, k, v, segment_ids_BL=seg, chunk=chunk)

  loss = lambda q, k, v: jnp.sum((out(q, k, v) * w).astype(jnp.float32))
  return jax.jit(out)(q, k, v), jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(q, k, v)


@pytest.mark.parametrize('chunk', [8, 32, 64])  # 5, 2 and 1 chunks
@pytest.mark.parametrize('packed', [False, True])
def test_chunked_equals_reference_with_grads(chunk, packed):
  """GQA (4 query heads on 2 kv heads), length 37 (a ragged last chunk for every size)."""
  b, length, h, g, kd = 2, 37, 4, 2, 8
  q, k, v = (normal((b, length, n, kd), s) for s, n in enumerate((h, g, g)))
  seg = None
  if packed:
    seg = jnp.asarray(np.repeat([[1, 2, 3], [1, 1, 2]], [10, 20, 7], axis=1), jnp.int32)
  ref, ref_grads = attention_and_grads('xla', q, k, v, seg)
  out, grads = attention_and_grads('chunked', q, k, v, seg, chunk)
  np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-6)
  for got, want in zip(grads, ref_grads):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_chunked_bf16_matches_reference_bf16():
  """Half precision keeps the reference's dtype rules (f32 scores and softmax, bf16 output)."""
  b, length, h, kd = 2, 64, 2, 16
  q, k, v = (normal((b, length, h, kd), s, jnp.bfloat16) for s in range(3))
  ref, ref_grads = attention_and_grads('xla', q, k, v, None)
  out, grads = attention_and_grads('chunked', q, k, v, None, 16)
  assert out.dtype == jnp.bfloat16
  f32 = lambda x: np.asarray(x, np.float32)
  np.testing.assert_allclose(f32(out), f32(ref), rtol=2e-2, atol=2e-2)
  for got, want in zip(grads, ref_grads):
    assert got.dtype == jnp.bfloat16
    np.testing.assert_allclose(f32(got), f32(want), rtol=5e-2, atol=5e-2)


def test_chunk_size_rule():
  lengths = (8, 64, 256, 300, 512, 4096)
  assert [chunked_attention.chunk_size(n) for n in lengths] == [64, 64, 64, 96, 128, 512]


def test_chunked_is_cpu_auto_and_plain_xla_elsewhere():
  """'chunked' chunks causal attention only; without a causal mask it is the reference."""
  assert flash.resolve_impl('auto', 'float32', 'cpu') == 'chunked'
  q, k, v = (normal((1, 12, 2, 8), s) for s in range(3))
  both = lambda impl: flash.flash_attention(q, k, v, impl=impl, causal=False)
  np.testing.assert_array_equal(both('chunked'), both('xla'))


def test_model_with_chunked_attention_equals_reference(monkeypatch):
  """The tiny config's loss and gradients with impl 'chunked' (2 chunks of 32) and 'xla' agree."""
  monkeypatch.setattr(chunked_attention, 'chunk_size', lambda length: 32)
  c = configs.tiny.get_config()
  c.attention.impl = 'xla'
  ref_cfg = configs.schema.load(c, 1).model
  cfg = dataclasses.replace(
    ref_cfg, attention=dataclasses.replace(ref_cfg.attention, impl='chunked')
  )
  toks = jnp.asarray(np.random.default_rng(0).integers(0, cfg.vocab_size, (2, 65)), jnp.int32)

  def loss_and_grads(model_cfg):
    model = Transformer(model_cfg, rngs=nnx.Rngs(0))
    graph, params, rest = nnx.split(model, nnx.Param, ...)

    def loss(p):
      logits, _ = nnx.merge(graph, p, rest)(toks[:, :-1])
      return jnp.mean(
        jax.nn.logsumexp(logits, -1) - jnp.take_along_axis(logits, toks[:, 1:, None], -1)[..., 0]
      )

    return jax.jit(jax.value_and_grad(loss))(params)

  ref_loss, ref_grads = loss_and_grads(ref_cfg)
  got_loss, got_grads = loss_and_grads(cfg)
  np.testing.assert_allclose(got_loss, ref_loss, rtol=1e-6)
  for got, want in zip(jax.tree.leaves(got_grads), jax.tree.leaves(ref_grads)):
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6 * float(np.abs(want).max()))


def test_scored_pairs_count_the_chunks_rows_times_their_prefix():
  assert chunked_attention.scored_pairs(256, 64) == 64 * (64 + 128 + 192 + 256)
  assert chunked_attention.scored_pairs(37, 8) == 8 * (8 + 16 + 24 + 32) + 5 * 37
  assert chunked_attention.scored_pairs(5, 1) == 1 + 2 + 3 + 4 + 5
