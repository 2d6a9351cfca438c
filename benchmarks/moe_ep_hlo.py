"""Counts the collectives XLA inserts in one expert-parallel MoE layer (fwd+bwd), per execution.

Usage: python -m benchmarks.moe_ep_hlo   (8 fake CPU devices, mesh (1, 2, 1, 4) fsdp_ep)
"""
import os, re, dataclasses
os.environ['XLA_FLAGS']='--xla_force_host_platform_device_count=8'
import jax, jax.numpy as jnp, numpy as np
from flax import nnx
from configs import moe_topk, schema, sharding
from model import axes
from model.moe_layer import MoE
from train import mesh as mesh_lib
for execution, router_ in [('dropless','topk'),('capacity','topk'),('dropless','expert_choice')]:
  cfg = schema.load(moe_topk.get_config('tiny'), 8)
  moe = dataclasses.replace(cfg.model.moe, execution=execution, router=router_)
  mc = dataclasses.replace(cfg.model, moe=moe)
  meshc = schema.MeshConfig(shape=(1,2,1,4), rules='fsdp_ep')
  mesh = mesh_lib.make_mesh(meshc, jax.devices())
  rules = sharding.rules('fsdp_ep')
  layer = nnx.eval_shape(lambda: MoE(mc, rngs=nnx.Rngs(0)))
  gdef, st = nnx.split(layer)
  shard = axes.state_shardings(st, mesh, rules)
  x = jax.ShapeDtypeStruct((8,64,64), jnp.float32, sharding=jax.sharding.NamedSharding(mesh, axes.logical_to_spec(('batch','length','act_embed'), rules, mesh)))
  st = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), st, shard)
  def f(st, x):
    with axes.axis_rules(mesh, rules):
      def loss(st):
        y, aux = nnx.merge(gdef, st)(x); return jnp.sum(y**2) + aux['loss']
      return jax.value_and_grad(loss)(st)
  txt = jax.jit(f).lower(st, x).compile().as_text()
  ops = re.findall(r' (all-to-all|all-gather|all-reduce|reduce-scatter|collective-permute|ragged-all-to-all)(?:-start)?\(', txt)
  from collections import Counter
  print(execution, router_, dict(Counter(ops)))
  for line in txt.splitlines():
    if re.search(r' (all-to-all|all-gather|reduce-scatter)(-start)?\(', line):
      print('   ', line.strip()[:200])
