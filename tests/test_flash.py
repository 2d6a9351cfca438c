"""Flash attention kernels (`model.flash`): dispatch per platform, one-line refusals, and splash in
Pallas interpret mode against the XLA references (dense causal, blocked local, folded routing).

cuDNN runs only on a GPU: here only its dispatch and refusals are tested.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import configs.routing_transformer
import configs.schema
import configs.tiny
from model import flash
from model.attention import causal_attention
from model.local_attention import local_attention
from model.routing_attention import routing_attention
from model.transformer import Transformer


def normal(shape, seed):
  return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), jnp.float32)


@pytest.mark.parametrize(
  'impl, dtype, platform, kernel',
  [
    ('auto', 'float32', 'cpu', 'chunked'),
    ('auto', 'bfloat16', 'cpu', 'chunked'),
    ('auto', 'bfloat16', 'gpu', 'cudnn'),
    ('auto', 'float32', 'gpu', 'xla'),
    ('auto', 'float32', 'tpu', 'splash'),
    ('auto', 'bfloat16', 'tpu', 'splash'),
    ('xla', 'bfloat16', 'tpu', 'xla'),
    ('chunked', 'bfloat16', 'gpu', 'chunked'),
    ('xla', 'float32', 'cpu', 'xla'),
    ('cudnn', 'bfloat16', 'gpu', 'cudnn'),
    ('splash', 'float32', 'tpu', 'splash'),
  ],
)
def test_dispatch_per_platform(impl, dtype, platform, kernel):
  assert flash.resolve_impl(impl, dtype, platform) == kernel
  assert flash.check_impl(impl, dtype, platform) == kernel


@pytest.mark.parametrize(
  'impl, dtype, platform, message',
  [
    ('splash', 'float32', 'cpu', "attention.impl='splash': splash needs a TPU backend"),
    ('splash', 'bfloat16', 'gpu', "attention.impl='splash': splash needs a TPU backend"),
    ('cudnn', 'bfloat16', 'cpu', "attention.impl='cudnn': cudnn needs a GPU backend"),
    ('cudnn', 'float32', 'gpu', "attention.impl='cudnn': cudnn flash attention needs a bfloat16"),
    ('flash', 'float32', 'gpu', "attention.impl='flash': expected one of"),
  ],
)
def test_missing_kernels_are_refused_in_one_line(impl, dtype, platform, message):
  with pytest.raises(ValueError, match='^' + message.replace('(', r'\(')) as err:
    flash.check_impl(impl, dtype, platform)
  assert '\n' not in str(err.value)


@pytest.mark.parametrize('config', ['tiny', 'routing_transformer'])
def test_a_model_with_a_missing_kernel_is_refused_at_build_time(config):
  """This process has no TPU: a dense or routing model asking for splash fails when built."""
  c = (
    configs.tiny.get_config()
    if config == 'tiny'
    else configs.routing_transformer.get_config('tiny')
  )
  c.attention.impl = 'splash'
  cfg = configs.schema.load(c, 1).model
  with pytest.raises(ValueError, match="^attention.impl='splash': splash needs a TPU backend"):
    nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0)))


def test_cudnn_refuses_packed_rows_and_blocked_local_masks():
  q = normal((1, 8, 2, 8), 0)
  seg = jnp.ones((1, 8), jnp.int32)
  with pytest.raises(ValueError, match="^attention.impl='cudnn': packed segment ids"):
    flash.flash_attention(q, q, q, segment_ids_BL=seg, impl='cudnn')
  with pytest.raises(ValueError, match="^attention.impl='cudnn': no blocked local mask"):
    flash.flash_attention(q, q, q, impl='cudnn', local_window=4)
  assert flash.call_kernel('cudnn', 'auto', packed=True) == 'xla'
  assert flash.call_kernel('cudnn', 'cudnn', packed=True) == 'cudnn'
  assert flash.call_kernel('splash', 'auto', packed=True) == 'splash'


def _compare(got_fn, want_fn, args, rtol=1e-5, atol=1e-5):
  """Outputs and gradients (of a fixed random projection of the output) agree."""
  np.testing.assert_allclose(got_fn(*args), want_fn(*args), rtol=rtol, atol=atol)
  cot = normal(want_fn(*args).shape, 99)
  grads = lambda f: jax.grad(lambda *a: jnp.sum(f(*a) * cot), argnums=tuple(range(len(args))))
  for got, want in zip(grads(got_fn)(*args), grads(want_fn)(*args)):
    np.testing.assert_allclose(got, want, rtol=rtol, atol=atol)


SEG = jnp.asarray([[1] * 10 + [2] * 16 + [0] * 6, [3] * 32], jnp.int32)


@pytest.mark.parametrize('local_window', [None, pytest.param(8, marks=pytest.mark.slow)])
def test_splash_interpret_equals_the_xla_references_gqa_packed(local_window):
  """Splash (Pallas interpret mode on CPU; padded to its 128-token blocks) with GQA (4 query heads
  on 2 kv heads) and packed segments: values and gradients of causal and blocked local attention."""
  b, l, h, g, kd = 2, 32, 4, 2, 16
  args = (normal((b, l, h, kd), 1), normal((b, l, g, kd), 2), normal((b, l, g, kd), 3))
  splash = functools.partial(
    flash.flash_attention, segment_ids_BL=SEG, impl='splash', interpret=True
  )
  if local_window is None:
    _compare(splash, functools.partial(causal_attention, segment_ids_BL=SEG), args)
  else:
    splash = functools.partial(splash, local_window=local_window)
    ref = functools.partial(local_attention, window=local_window, segment_ids_BL=SEG)
    _compare(splash, ref, args)
    xla = functools.partial(flash.flash_attention, segment_ids_BL=SEG, impl='xla')
    _compare(functools.partial(xla, local_window=local_window), ref, args)


@pytest.mark.slow  # the folding is proved in the default run through XLA (test_routing_attention)
def test_routing_folded_through_splash_interpret_equals_the_reference(monkeypatch):
  """Routing clusters folded into the batch axis through splash (interpret) equal the einsum
  reference, with segment-0 queries that see no key and multi-picked tokens."""
  monkeypatch.setattr(
    flash, 'flash_attention', functools.partial(flash.flash_attention, interpret=True)
  )
  b, l, h, kd, n, w = 2, 24, 2, 8, 5, 8
  means = normal((h, n, kd), 12)
  seg = jnp.asarray([[1] * 3 + [2] * 3 + [0] * 18, [1] * 10 + [2] * 14], jnp.int32)

  def routed(impl):
    return lambda x, v: (
      routing_attention(x, x, v, means, window=w, scale=0.5, segment_ids_BL=seg, impl=impl).out_BLHK
    )

  _compare(routed('splash'), routed(None), (normal((b, l, h, kd), 10), normal((b, l, h, kd), 11)))


@pytest.mark.parametrize('layer_cls', [pytest.param('routing', marks=pytest.mark.slow), 'local'])
def test_layers_on_splash_interpret_equal_their_xla_path(layer_cls, monkeypatch):
  """The routing layer (folded routing heads, local heads) and the local-only layer pick the
  kernel built into them: switched to splash (interpret), their outputs equal the XLA path's."""
  from model.local_layer import LocalAttention  # pylint: disable=g-import-not-at-top
  from model.routing_layer import RoutingAttention  # pylint: disable=g-import-not-at-top

  calls, kernel = [], flash.flash_attention

  def interpreted(*args, **kw):
    calls.append(kw['impl'])
    return kernel(*args, interpret=True, **kw)

  monkeypatch.setattr(flash, 'flash_attention', interpreted)
  cfg = configs.schema.load(configs.routing_transformer.get_config('tiny'), 1).model
  cls = RoutingAttention if layer_cls == 'routing' else LocalAttention
  layer = cls(cfg, rngs=nnx.Rngs(0))
  b, l = 2, 64
  x = normal((b, l, cfg.d_model), 20)
  pos = jnp.broadcast_to(jnp.arange(l), (b, l))
  seg = jnp.asarray([[1] * 20 + [2] * 30 + [0] * 14, [1] * 64], jnp.int32)
  out = lambda: jax.tree.leaves(layer(x, pos, seg))[0]
  assert layer.kernel == 'chunked'  # CPU's auto: these layers run their XLA path for it
  want = out()
  layer.kernel = 'splash'
  assert not calls
  np.testing.assert_allclose(out(), want, rtol=1e-5, atol=1e-5)
  assert calls == (['splash', 'splash'] if layer_cls == 'routing' else ['splash'])
