"""Logical axis names: parameters declared with them, activations constrained by them.

Model code names only logical axes (`embed`, `heads`, `batch`, `act_embed`, ...). The training code
binds a mesh and a rule preset with `axis_rules(mesh, rules)`; outside that context every
constraint is a no-op, so the model runs unsharded in tests and notebooks unchanged.
"""

import contextlib
import dataclasses
import threading
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

Names = Sequence[str | None]

RESIDUAL = ('batch', 'length', 'act_embed')  # the residual stream x_BLD between sublayers


@dataclasses.dataclass
class _Context(threading.local):
  mesh: Mesh | None = None
  rules: dict | None = None


_ctx = _Context()


@contextlib.contextmanager
def axis_rules(mesh: Mesh, rules: dict):
  """Binds logical names to `mesh` axes for the constraints traced inside the block."""
  previous = (_ctx.mesh, _ctx.rules)
  _ctx.mesh, _ctx.rules = mesh, rules
  try:
    yield
  finally:
    _ctx.mesh, _ctx.rules = previous


def logical_to_spec(names: Names, rules: dict, mesh: Mesh | None = None) -> PartitionSpec:
  """Maps logical names to a PartitionSpec; a mesh axis is used at most once per spec.

  Mesh axes of size 1 are dropped when a mesh is given, so specs stay minimal.
  """
  used: set[str] = set()
  out = []
  for name in names:
    target = rules.get(name) if name is not None else None
    axes = (target,) if isinstance(target, str) else tuple(target or ())
    keep = tuple(a for a in axes if a not in used and (mesh is None or mesh.shape[a] > 1))
    used.update(keep)
    out.append(None if not keep else keep[0] if len(keep) == 1 else keep)
  return PartitionSpec(*out)


def constrain(x: jax.Array, names: Names) -> jax.Array:
  """Sharding constraint on an activation by logical names; no-op without `axis_rules`."""
  if _ctx.mesh is None:
    return x
  if len(names) != x.ndim:
    raise ValueError(f'logical names {tuple(names)} do not match an array of rank {x.ndim}')
  spec = logical_to_spec(names, _ctx.rules, _ctx.mesh)
  return jax.lax.with_sharding_constraint(x, NamedSharding(_ctx.mesh, spec))


def mesh_ways(name: str) -> int:
  """Devices the bound mesh splits logical axis `name` over (1 without `axis_rules`)."""
  if _ctx.mesh is None:
    return 1
  part = logical_to_spec((name,), _ctx.rules, _ctx.mesh)[0]
  ways = 1
  for a in (part,) if isinstance(part, str) else tuple(part or ()):
    ways *= _ctx.mesh.shape[a]
  return ways


def shard_call(fn: Callable, *args, names: Sequence[Names]) -> jax.Array:
  """`fn(*args)` on each device's shard (`jax.shard_map`) when a mesh is bound, else plainly.

  For kernels XLA cannot partition (Pallas/Mosaic calls) whose work is independent along the
  dimensions named here; `names` gives each argument's logical names. The one output has the
  first argument's shape and sharding. A dimension that its mesh axes do not divide is kept whole
  (computed redundantly on those devices), never split unevenly.
  """
  mesh = _ctx.mesh
  if mesh is None or mesh.size == 1:
    return fn(*args)

  def spec(shape, dim_names):
    parts = []
    for size, part in zip(shape, logical_to_spec(dim_names, _ctx.rules, mesh), strict=True):
      ways = 1
      for a in (part,) if isinstance(part, str) else tuple(part or ()):
        ways *= mesh.shape[a]
      parts.append(part if size % ways == 0 else None)
    return PartitionSpec(*parts)

  in_specs = tuple(spec(jnp.shape(a), n) for a, n in zip(args, names, strict=True))
  return jax.shard_map(fn, mesh=mesh, in_specs=in_specs, out_specs=in_specs[0], check_vma=False)(
    *args
  )


def param(
  rngs: nnx.Rngs, init: Callable, shape: Sequence[int], names: Names, dtype=jnp.float32
) -> nnx.Param:
  """A parameter initialised by `init` and annotated with logical axis names."""
  if len(names) != len(shape):
    raise ValueError(f'logical names {tuple(names)} do not match shape {tuple(shape)}')
  return nnx.Param(
    init(rngs.params(), tuple(shape), dtype), out_sharding=tuple(names), eager_sharding=False
  )


def state_shardings(state: nnx.State, mesh: Mesh, rules: dict) -> nnx.State:
  """NamedShardings for every variable of an abstract or concrete state, from its metadata."""
  specs = nnx.get_partition_spec(state)

  def to_sharding(leaf):
    spec = leaf if isinstance(leaf, PartitionSpec) else PartitionSpec()
    return NamedSharding(mesh, logical_to_spec(tuple(spec), rules, mesh))

  return jax.tree.map(to_sharding, specs, is_leaf=lambda x: isinstance(x, PartitionSpec))


class RoutingState(nnx.Variable):
  """State of a routed layer that is not learned by gradient (k-means centroids, balancing
  biases, entropy-trigger state). The optimizer never sees it (it updates `nnx.Param` only); the
  train step updates it after the gradient through the layer's `update_state(stats)`; it is saved
  and restored with the model."""


def routing_state(value: jax.Array, names: Names) -> RoutingState:
  """A RoutingState holding `value`, annotated with logical axis names."""
  if len(names) != jnp.ndim(value):
    raise ValueError(f'logical names {tuple(names)} do not match shape {jnp.shape(value)}')
  if not names:  # flax drops an empty name tuple when stacking layers, then fails to unstack it
    raise ValueError('routing state must have rank >= 1: store a scalar as shape (1,)')
  return RoutingState(value, out_sharding=tuple(names), eager_sharding=False)
