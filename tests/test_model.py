"""Dense transformer: causality, scan == loop, remat, GQA, packing, sharding metadata, dtypes."""

import dataclasses
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import configs.schema
import configs.sharding
import configs.tiny
from model import axes, plan
from model.attention import attention_impl, causal_attention
from model.block import Block
from model.layers import apply_rope
from model.transformer import Transformer


def tiny(**overrides):
  cfg = configs.schema.load(configs.tiny.get_config(), 8).model
  return dataclasses.replace(cfg, **overrides)


def make(cfg, seed=0):
  """A model with numpy-drawn weights (std 0.1, norm scales near 1) on the real structure.

  Eager jax initialisation compiles a random kernel per parameter shape (seconds on 2 cores);
  `test_init` covers the real initialiser. Larger weights than init also make attention non-uniform.
  """
  model = nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0)))
  rng = np.random.default_rng(seed)
  state = nnx.state(model)
  draw = lambda a: (1.0 if a.ndim == 1 else 0.0) + 0.1 * rng.standard_normal(a.shape)
  pure = jax.tree.map(lambda a: jnp.asarray(draw(a), a.dtype), nnx.to_pure_dict(state))
  nnx.replace_by_pure_dict(state, pure)
  nnx.update(model, state)
  return model


def tokens(cfg, b=2, l=16, seed=0):
  return jnp.asarray(np.random.default_rng(seed).integers(0, cfg.vocab_size, (b, l)), jnp.int32)


def normal(shape, seed):
  return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), jnp.float32)


@nnx.jit
def forward(model, toks, positions_BL=None, segment_ids_BL=None):
  """One compiled forward per model structure; eager calls would compile op by op."""
  return model(toks, positions_BL=positions_BL, segment_ids_BL=segment_ids_BL)


def params(model):
  return nnx.to_pure_dict(nnx.state(model, nnx.Param))


def scan_to_loop(scan_model, loop_model):
  """Copies the stacked [num_layers, ...] block weights of a scan model into a loop model."""
  pure = params(scan_model)
  stacked = pure['stages'][0].pop('blocks')
  n = jax.tree.leaves(stacked)[0].shape[0]
  pure['stages'][0]['blocks'] = {i: jax.tree.map(lambda a, i=i: a[i], stacked) for i in range(n)}
  state = nnx.state(loop_model, nnx.Param)
  nnx.replace_by_pure_dict(state, pure)
  nnx.update(loop_model, state)


def assert_close(a, b, rtol):
  """Every leaf equal to `rtol` relative to that leaf's largest magnitude."""
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    x, y = np.asarray(x), np.asarray(y)
    np.testing.assert_allclose(x, y, rtol=rtol, atol=rtol * max(np.abs(y).max(), 1e-30))


def test_init():
  cfg = tiny(num_layers=4)
  model = Transformer(cfg, rngs=nnx.Rngs(0))
  p = params(model)
  assert plan.build(cfg).params == sum(a.size for a in jax.tree.leaves(p))
  blocks = p['stages'][0]['blocks']
  assert not np.allclose(blocks['mlp']['w_up'][0], blocks['mlp']['w_up'][1]), 'layers identical'
  np.testing.assert_allclose(np.std(blocks['attn']['wq']), cfg.init_std, rtol=0.05)
  np.testing.assert_allclose(np.std(p['embed']['embedding']), cfg.init_std, rtol=0.05)
  for w in (blocks['attn']['wo'], blocks['mlp']['w_down']):  # residual outputs: / sqrt(2 * 4)
    np.testing.assert_allclose(np.std(w), cfg.init_std / np.sqrt(8), rtol=0.05)
  np.testing.assert_array_equal(blocks['attn_norm']['scale'], 1.0)


def test_causal():
  cfg = tiny()
  model = make(cfg)
  toks = tokens(cfg, b=1, l=8)
  w_V = normal((cfg.vocab_size,), 1)
  perturbed = jnp.concatenate(
    [toks] + [toks.at[0, t].set((toks[0, t] + 1) % cfg.vocab_size) for t in (1, 5)]
  )

  @jax.jit
  def check(state):
    # nnx.scan refuses Variables from an outer trace level (here jit's, inside jacrev): merge
    # with copy=True so the model used under jacrev owns fresh Variables.
    f = lambda x: nnx.merge(graphdef, state, copy=True).from_embeddings(x)[0] @ w_V
    model = nnx.merge(graphdef, state)
    return jax.jacrev(f)(model.embed(toks))[0, :, 0], model(perturbed)[0]

  graphdef, state = nnx.split(model)
  jac, logits = check(state)
  # |d logit_t . w / d x_s| summed over the embedding: zero exactly when s > t, nonzero else.
  norms = np.abs(np.asarray(jac)).sum(-1)
  assert np.all(norms[np.triu_indices(8, k=1)] == 0.0), 'logits depend on later inputs'
  assert np.all(norms[np.tril_indices(8)] > 0.0), 'logits ignore earlier inputs'
  # Through the token path: changing token t changes no logits before t, bit for bit.
  logits = np.asarray(logits)
  for row, t in ((1, 1), (2, 5)):
    np.testing.assert_array_equal(logits[row, :t], logits[0, :t])
    assert not np.array_equal(logits[row, t], logits[0, t])


def test_scan_equals_loop(monkeypatch):
  # Give every block a nonzero aux loss and a metric so their reduction is compared too.
  call = Block.__call__

  def with_aux(self, x, *args):
    y, _ = call(self, x, *args)
    return y, {
      'loss': jnp.mean(y**2).astype(jnp.float32),
      'metrics': {'mean': jnp.mean(y)},
      'stats': {},
    }

  monkeypatch.setattr(Block, '__call__', with_aux)
  cfg = tiny(num_layers=3)
  scan_model = make(cfg, seed=0)
  loop_model = make(dataclasses.replace(cfg, scan_layers=False), seed=1)
  scan_to_loop(scan_model, loop_model)
  toks = tokens(cfg)
  patched_forward = nnx.jit(lambda model, toks: model(toks))  # not cached with the real Block
  logits_s, aux_s = patched_forward(scan_model, toks)
  logits_l, aux_l = patched_forward(loop_model, toks)
  np.testing.assert_allclose(logits_s, logits_l, rtol=1e-5, atol=1e-5 * np.abs(logits_l).max())
  assert sorted(aux_s['metrics']) == [f'layer_{i}/mean' for i in range(3)]
  assert_close(aux_s, aux_l, 1e-5)
  assert aux_s['loss'] > 0


@pytest.mark.parametrize('scan', [True, False])
def test_remat_policies_match_none(scan):
  policies = ('none', 'full', 'save_dots', 'save_dots_no_batch')
  graphdefs = [nnx.graphdef(make(tiny(scan_layers=scan, remat=r))) for r in policies]
  state = nnx.state(make(tiny(scan_layers=scan)))  # the same weights under every policy
  toks = tokens(tiny())

  def loss_fn(state, graphdef):
    logits, aux = nnx.merge(graphdef, state)(toks[:, :-1])
    nll = -jnp.take_along_axis(jax.nn.log_softmax(logits), toks[:, 1:, None], -1).mean()
    return nll + aux['loss']

  # One compilation for all four policies: compile time dominates this test on CPU.
  results = jax.jit(lambda s: [jax.value_and_grad(loss_fn)(s, g) for g in graphdefs])(state)
  for policy, g in zip(policies, graphdefs):
    jaxpr = str(jax.make_jaxpr(lambda s, g=g: loss_fn(s, g))(state))
    has_remat = re.search(r'\b(remat\d*|checkpoint)\[', jaxpr) is not None  # remat2 in jax 0.10
    assert has_remat == (policy != 'none'), policy
  (ref_loss, ref_grads), *others = results
  for loss, grads in others:
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-6)
    assert_close(nnx.to_pure_dict(grads), nnx.to_pure_dict(ref_grads), 1e-6)


def test_gqa_equals_mha_with_repeated_kv():
  gqa_cfg = tiny(num_heads=4, num_kv_heads=2, scan_layers=False)
  gqa = make(gqa_cfg, seed=0)
  mha = make(dataclasses.replace(gqa_cfg, num_kv_heads=4), seed=1)
  pure = params(gqa)
  for block in pure['stages'][0]['blocks'].values():
    for name in ('wk', 'wv'):  # [D, G, K] -> [D, H, K]: query head h reads kv head h // (H/G)
      block['attn'][name] = jnp.repeat(block['attn'][name], 2, axis=1)
  state = nnx.state(mha, nnx.Param)
  nnx.replace_by_pure_dict(state, pure)
  nnx.update(mha, state)
  toks = tokens(gqa_cfg)
  out_gqa, out_mha = forward(gqa, toks)[0], forward(mha, toks)[0]
  np.testing.assert_allclose(out_gqa, out_mha, rtol=1e-5, atol=1e-5 * np.abs(out_mha).max())


def test_packed_segments_equal_separate_documents():
  cfg = tiny()
  model = make(cfg)
  docs = tokens(cfg, b=2, l=8, seed=1)
  packed = docs.reshape(1, 16)
  positions = jnp.tile(jnp.arange(8), 2)[None]
  segments = jnp.repeat(jnp.arange(1, 3), 8)[None]
  out, _ = forward(model, packed, positions, segments)
  alone, _ = forward(model, docs)  # each document in its own row, positions 0..7
  np.testing.assert_allclose(
    out.reshape(2, 8, -1), alone, rtol=1e-5, atol=1e-5 * np.abs(alone).max()
  )
  # With one segment the second document sees the first: the test can tell them apart.
  leaky, _ = forward(model, packed, positions, jnp.ones_like(segments))
  assert not np.allclose(leaky[0, 8:], alone[1], rtol=1e-3, atol=1e-3 * np.abs(alone).max())


def test_attention_matches_reference_with_segments():
  b, l, h, g, k = 2, 9, 4, 2, 8
  q, kk, v = (normal((b, l, n, k), seed) for seed, n in enumerate((h, g, g)))
  seg = jnp.array([[0, 0, 0, 1, 1, 1, 1, 2, 2], [0] * 9])

  @jax.jit
  def reference(q, kk, v, seg):
    kr, vr = jnp.repeat(kk, h // g, axis=2), jnp.repeat(v, h // g, axis=2)
    s = jnp.einsum('bqhk,bshk->bhqs', q, kr) / np.sqrt(k)
    ok = jnp.tril(jnp.ones((l, l), bool)) & (seg[:, None, :, None] == seg[:, None, None, :])
    return jnp.einsum('bhqs,bshk->bqhk', jax.nn.softmax(jnp.where(ok, s, -jnp.inf), -1), vr)

  out = jax.jit(causal_attention)(q, kk, v, segment_ids_BL=seg)
  ref = reference(q, kk, v, seg)
  np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)


def test_rope_is_relative():
  q, k = normal((1, 1, 1, 16), 0), normal((1, 1, 1, 16), 1)
  rope_dot = jax.jit(
    lambda m, n: jnp.sum(
      apply_rope(q, jnp.array([[m]]), 1e4) * apply_rope(k, jnp.array([[n]]), 1e4)
    )
  )
  dot = lambda m, n: float(rope_dot(m, n))
  np.testing.assert_allclose(dot(3, 1), dot(10, 8), rtol=1e-5)
  np.testing.assert_allclose(dot(0, 0), float(jnp.sum(q * k)), rtol=1e-5)
  assert abs(dot(3, 1) - dot(3, 2)) > 1e-3


@pytest.mark.parametrize('scan', [True, False])
def test_param_sharding_metadata(scan):
  cfg = tiny(scan_layers=scan, tie_embeddings=False)
  model = nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0)))
  state = nnx.state(model, nnx.Param)
  leaves = jax.tree_util.tree_leaves_with_path(state, is_leaf=lambda x: isinstance(x, nnx.Param))
  assert len(leaves) == (3 + 9 if scan else 3 + 9 * cfg.num_layers)
  for path, p in leaves:
    names = p.get_metadata()['out_sharding']
    assert len(names) == p.ndim, (jax.tree_util.keystr(path), names, p.shape)
    in_block = jax.tree_util.keystr(path).startswith("['stages'][0]['blocks']")
    assert (names[0] == 'layers') == (scan and in_block), (jax.tree_util.keystr(path), names)
  for spec in jax.tree.leaves(
    nnx.get_partition_spec(state), is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec)
  ):
    assert isinstance(spec, jax.sharding.PartitionSpec)


def test_sharded_forward_equals_unsharded():
  cfg = tiny(tie_embeddings=False)  # the untied head's ('embed', 'vocab') sharding too
  model = make(cfg)
  toks = tokens(cfg, b=4)
  expected, _ = forward(model, toks)
  mesh = jax.make_mesh(
    (2, 2, 2, 1), configs.sharding.MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * 4
  )
  rules = configs.sharding.rules('fsdp_tp')
  graphdef, state = nnx.split(model)
  state = jax.device_put(state, axes.state_shardings(state, mesh, rules))
  wq = state['stages'][0]['blocks']['attn']['wq'][...]
  assert wq.sharding.spec == jax.sharding.PartitionSpec(None, 'fsdp', 'tensor', None)

  @jax.jit
  def sharded_forward(state, toks):
    with axes.axis_rules(mesh, rules):
      return nnx.merge(graphdef, state)(toks)[0]

  out = sharded_forward(state, toks)
  np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5 * np.abs(expected).max())


def test_bf16_compute_close_to_f32():
  # Same f32 parameters, different compute dtype. bf16 keeps 8 mantissa bits (relative rounding
  # 2**-9 ~ 2e-3 per op); after two blocks the logits differ from f32 by about 0.5% of their norm
  # (0.8% after 12), so 2% relative-norm is a bf16 bound, not a loosened f32 test.
  toks = tokens(tiny())
  f32_model = make(tiny(dtype='float32'))
  bf16_model = make(tiny(dtype='bfloat16'))
  assert bf16_model.embed.embedding[...].dtype == jnp.float32
  ref, _ = forward(f32_model, toks)
  out, aux = forward(bf16_model, toks)
  assert out.dtype == jnp.float32 and aux['loss'].dtype == jnp.float32
  err = float(jnp.linalg.norm(out - ref) / jnp.linalg.norm(ref))
  assert err < 2e-2, err
  assert err > 0, 'bf16 path computed in f32'


@pytest.mark.parametrize('tie', [True, False])
def test_count_params_and_flops(tie):
  cfg = tiny(tie_embeddings=tie)
  d, v, f, k = cfg.d_model, cfg.vocab_size, cfg.mlp_dim, cfg.head_dim
  per_layer = 2 * d + 2 * d * cfg.num_heads * k + 2 * d * cfg.num_kv_heads * k + 3 * d * f
  counts = plan.build(cfg, 64)
  assert counts.params == v * d + cfg.num_layers * per_layer + d + (0 if tie else d * v)
  assert counts.active_params == cfg.num_layers * (per_layer - 2 * d) + d * v
  assert counts.flops_per_token == 6 * counts.active_params + 12 * cfg.num_layers * d * 64


def test_attention_impl_choice():
  assert attention_impl('xla', 'bfloat16') == 'xla'
  assert attention_impl('cudnn', 'float32') == 'cudnn'
  assert attention_impl('splash', 'float32') == 'splash'
  assert attention_impl('chunked', 'float32') == 'chunked'
  backend = jax.default_backend()
  assert attention_impl('auto', 'float32') == {'cpu': 'chunked', 'tpu': 'splash'}.get(
    backend, 'xla'
  )
  expected = {'gpu': 'cudnn', 'tpu': 'splash', 'cpu': 'chunked'}[backend]
  assert attention_impl('auto', 'bfloat16') == expected
  for platform, kernel in (('cpu', 'chunked'), ('gpu', 'cudnn'), ('tpu', 'splash')):
    assert attention_impl('auto', 'bfloat16', platform) == kernel
  assert attention_impl('auto', 'float32', 'gpu') == 'xla'
  with pytest.raises(ValueError, match="^attention.impl='flash': expected one of"):
    attention_impl('flash', 'float32')


def test_matmul_params_of_routing_attention_layers_match_the_model():
  """Routing heads have no K projection (their keys are their queries): the parameter difference
  to the dense model is exactly the matmul-weight difference."""
  from configs import routing_transformer, schema  # pylint: disable=g-import-not-at-top

  c = routing_transformer.get_config('tiny')
  c.model.num_kv_heads = c.model.num_heads  # without GQA the routing layers are smaller
  routed = schema.load(c, 1).model
  dense = dataclasses.replace(routed, attention=dataclasses.replace(routed.attention, kind='dense'))
  routed_plan, dense_plan = plan.build(routed, 64), plan.build(dense, 64)
  assert routed_plan.params - dense_plan.params == (
    routed_plan.active_params - dense_plan.active_params
  )
  assert routed_plan.active_params < dense_plan.active_params
