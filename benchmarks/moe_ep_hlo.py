"""Counts the collectives XLA inserts in one expert-parallel MoE layer (fwd+bwd), per execution.

The communication table of docs/moe.md comes from this script: the compiled HLO of the tiny
`moe_topk` layer on 8 fake CPU devices, mesh (data, fsdp, tensor, expert) = (1, 2, 1, 4), fsdp_ep.

Usage: python -m benchmarks.moe_ep_hlo [--verbose]
"""

import collections
import dataclasses
import os
import re
import sys

os.environ['XLA_FLAGS'] = '--xla_force_host_platform_device_count=8'

import jax  # pylint: disable=g-import-not-at-top
import jax.numpy as jnp
from flax import nnx

from configs import moe_topk, schema, sharding
from model import axes
from model.moe_layer import MoE
from train import mesh as mesh_lib

_COLLECTIVE = re.compile(
  r' (all-to-all|all-gather|all-reduce|reduce-scatter|collective-permute|'
  r'ragged-all-to-all)(?:-start)?\('
)
VARIANTS = (('dropless', 'topk'), ('capacity', 'topk'), ('dropless', 'expert_choice'))


def compiled_hlo(execution: str, router: str) -> str:
  cfg = schema.load(moe_topk.get_config('tiny'), 8)
  model_cfg = dataclasses.replace(
    cfg.model, moe=dataclasses.replace(cfg.model.moe, execution=execution, router=router)
  )
  mesh = mesh_lib.make_mesh(schema.MeshConfig(shape=(1, 2, 1, 4), rules='fsdp_ep'))
  rules = sharding.rules('fsdp_ep')
  graphdef, state = nnx.split(nnx.eval_shape(lambda: MoE(model_cfg, rngs=nnx.Rngs(0))))
  state = jax.tree.map(
    lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
    state,
    axes.state_shardings(state, mesh, rules),
  )
  spec = axes.logical_to_spec(('batch', 'length', 'act_embed'), rules, mesh)
  x = jax.ShapeDtypeStruct(
    (8, 64, model_cfg.d_model), jnp.float32, sharding=jax.sharding.NamedSharding(mesh, spec)
  )

  def loss_and_grad(state, x_BLD):
    with axes.axis_rules(mesh, rules):

      def loss(state):
        y_BLD, aux = nnx.merge(graphdef, state)(x_BLD)
        return jnp.sum(y_BLD**2) + aux['loss']

      return jax.value_and_grad(loss)(state)

  return jax.jit(loss_and_grad).lower(state, x).compile().as_text()


def main():
  verbose = '--verbose' in sys.argv
  for execution, router in VARIANTS:
    hlo = compiled_hlo(execution, router)
    print(f'{execution:9s} {router:14s}', dict(collections.Counter(_COLLECTIVE.findall(hlo))))
    if verbose:
      for line in hlo.splitlines():
        if _COLLECTIVE.search(line):
          print('   ', line.strip()[:200])


if __name__ == '__main__':
  main()
