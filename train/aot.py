"""Ahead-of-time compilation of the real train step for a topology, and what it tells.

`analyse(cfg, topo)` lowers and compiles `train.step.make_step_fns`'s jitted step with the run's
mesh rules and shardings for the topology's devices, runs nothing, and returns the plan report:
per-device memory from XLA's buffer assignment against the chip's HBM, XLA's FLOP count beside
the model's, the collectives by kind with their bytes per step (`train.hlo_stats`), every
parameter's sharding, and a roofline estimate of step time and MFU from the chip's public peaks.
The command line is `python -m train.plan` (docs/scaling.md).
"""

import dataclasses
import math
import os
import re
import warnings

import jax
import jax.numpy as jnp

from configs import schema, sharding
from model import plan as layer_plan
from model import platform as target_platform
from train import hlo_stats, topology
from train import mesh as mesh_lib
from train.memory import fmt_bytes
from train.step import make_step_fns


def load(config, topo: topology.Topology) -> schema.Config:
  """The validated config for the topology's device count, kernels checked for its platform."""
  with target_platform.compiling_for(topo.platform):
    return schema.load(config, len(topo.devices))


def abstract_batch(cfg: schema.Config, batch_sharding) -> dict:
  """Shapes of one global batch as the data pipeline makes it (packing adds three arrays)."""
  shape = (cfg.train.batch_size, cfg.train.seq_len)
  keys = {'inputs': jnp.int32, 'targets': jnp.int32}
  if cfg.data.packing:
    keys.update(segment_ids=jnp.int32, positions=jnp.int32, weights=jnp.float32)
  return {k: jax.ShapeDtypeStruct(shape, t, sharding=batch_sharding) for k, t in keys.items()}


def _per_device_bytes(abstract_tree) -> int:
  """Bytes one device holds of arrays with shardings: each leaf's shard, the largest shard."""
  total = 0
  for leaf in jax.tree.leaves(abstract_tree):
    shard = leaf.sharding.shard_shape(leaf.shape)
    total += math.prod(shard) * jnp.dtype(leaf.dtype).itemsize
  return total


def step_fns(cfg: schema.Config, topo: topology.Topology):
  """(StepFns, the abstract batch) of `cfg` on the topology's devices: shapes and shardings only."""
  with target_platform.compiling_for(topo.platform):
    mesh = mesh_lib.make_mesh(cfg.mesh, topo.devices)
    fns = make_step_fns(cfg, mesh, sharding.rules(cfg.mesh.rules))
    return fns, abstract_batch(cfg, fns.batch_sharding)


def _compile(fns, batch, topo: topology.Topology):
  """The train step compiled for the topology's devices; nothing runs."""
  with target_platform.compiling_for(topo.platform):
    lowered = fns.train_step.lower(fns.abstract_state(), batch)
    # A program for devices this process lacks cannot be cached (or read back) here.
    cached = jax.config.jax_enable_compilation_cache
    jax.config.update('jax_enable_compilation_cache', cached and topo.platform == 'cpu')
    try:
      with warnings.catch_warnings():  # the cache, if already on, tries to read it back anyway
        warnings.filterwarnings('ignore', 'Error reading persistent compilation cache entry')
        return lowered.compile()
    finally:
      jax.config.update('jax_enable_compilation_cache', cached)


# XLA:TPU refuses a program that cannot fit: "... HLO temporaries (22.78G) exceeds available HBM
# (15.75G)". Then that is the answer: it does not fit, by these numbers.
_REFUSED = re.compile(
  r'RESOURCE_EXHAUSTED.*\(([\d.]+)([KMGT])\) exceeds available HBM \(([\d.]+)([KMGT])\)'
)


def _gib_text(number: str, unit: str) -> int:
  return int(float(number) * (1 << (10 * ' KMGT'.index(unit))))


def analyse(cfg: schema.Config, topo: topology.Topology) -> dict:
  """The plan of `cfg` on `topo`: memory, FLOPs, collectives and a roofline estimate (a dict
  that is also the JSON report). A step the TPU compiler refuses for lack of HBM is reported as
  not fitting, with the compiler's numbers."""
  fns, batch = step_fns(cfg, topo)
  report = _report(cfg, topo, fns, batch)
  try:
    compiled = _compile(fns, batch, topo)
  except jax.errors.JaxRuntimeError as e:
    refused = _REFUSED.search(str(e))
    if refused is None:
      raise
    m = report['memory_per_device']
    temps, available = _gib_text(*refused.group(1, 2)), _gib_text(*refused.group(3, 4))
    m.update(
      xla_temporaries=temps,
      total=m['params'] + m['optimizer'] + m['batch'] + temps,
      capacity=available,
      capacity_source='HBM XLA:TPU can allocate (it refused to compile the step)',
      fits=False,
    )
    report['compiler_message'] = str(e).splitlines()[0][:300]
    report['estimate'] = {'note': 'not compiled: the step does not fit'}
    return report
  n = len(topo.devices)
  mem = compiled.memory_analysis()
  capacity, capacity_source = _capacity(topo)
  total = (
    mem.argument_size_in_bytes
    + mem.output_size_in_bytes
    - mem.alias_size_in_bytes
    + mem.temp_size_in_bytes
    + mem.generated_code_size_in_bytes
  )
  hlo = compiled.as_text()
  report['memory_per_device'].update(
    xla_arguments=mem.argument_size_in_bytes,
    xla_outputs=mem.output_size_in_bytes,
    xla_aliased=mem.alias_size_in_bytes,
    xla_temporaries=mem.temp_size_in_bytes,
    xla_code=mem.generated_code_size_in_bytes,
    total=total,
    capacity=capacity,
    capacity_source=capacity_source,
    fits=capacity is None or total <= capacity,
    largest_arrays=[{'array': a, 'bytes': b} for a, b in hlo_stats.largest_arrays(hlo)],
  )
  cost = _first(compiled.cost_analysis())
  flops = report['flops_per_step']
  flops['xla_compiled_loops_once'] = float(cost.get('flops', 0.0)) * n
  comms = hlo_stats.collectives(hlo)
  report['collectives_per_step'] = {
    kind: {
      'count': comms.count.get(kind, 0),
      'result_bytes': comms.result_bytes.get(kind, 0),
      'link_bytes': comms.link_bytes.get(kind, 0),
    }
    for kind in hlo_stats.KINDS
  }
  report['collective_loops_unknown'] = comms.unknown_loops
  report['estimate'] = _roofline(topo, cost, flops['xla_cost_analysis'], flops['model'], comms)
  return report


def _report(cfg: schema.Config, topo: topology.Topology, fns, batch) -> dict:
  """What the plan knows before compiling: the run's shape, state bytes, model FLOPs."""
  n = len(topo.devices)
  state = fns.abstract_state()
  model = layer_plan.build(cfg.model, cfg.train.seq_len)
  model_flops = model.flops_per_token * cfg.train.batch_size * cfg.train.seq_len
  xla_flops = reference_flops(cfg)
  return {
    'topology': topo.name,
    'platform': topo.platform,
    'devices': n,
    'device_kind': topo.devices[0].device_kind,
    'mesh': dict(zip(sharding.MESH_AXES, cfg.mesh.resolved_shape(n))),
    'rules': cfg.mesh.rules,
    'batch': {
      'global': cfg.train.batch_size,
      'seq_len': cfg.train.seq_len,
      'grad_accum': cfg.train.grad_accum,
      'per_device': batch['inputs'].sharding.shard_shape(batch['inputs'].shape)[0],
    },
    'remat': cfg.model.remat,
    'model_params': model.params,
    'active_params_per_token': model.active_params,
    'memory_per_device': {
      'params': _per_device_bytes(state['model']),
      'optimizer': _per_device_bytes(state['opt']),
      'batch': _per_device_bytes(batch),
    },
    'flops_per_step': {
      'xla_cost_analysis': xla_flops,
      'model': model_flops,
      'xla_over_model': xla_flops / model_flops if model_flops else None,
      # The expert scan's block loop counts once in XLA's analysis: comparable for dense FFNs only.
      'comparable': cfg.moe.num_experts == 0 and cfg.uoe.feed_forward == 'mlp',
    },
    'collectives_per_step': None,
    'collective_loops_unknown': None,
    'estimate': None,
    'parameters': _parameter_shardings(fns),
  }


def _first(cost) -> dict:
  return (cost[0] if isinstance(cost, list) else cost) or {}


def reference_flops(cfg: schema.Config) -> float:
  """XLA's FLOP count of the whole train step: its cost analysis of the program lowered for one
  CPU device with the layers unrolled and XLA kernels (attention 'xla', MoE 'scan').

  The compiled program cannot give it: XLA counts a while loop's body once (scanned layers), and
  nothing inside Pallas kernels (splash, megablox).
  """
  m = cfg.model
  model = dataclasses.replace(
    m,
    scan_layers=False,
    attention=dataclasses.replace(m.attention, impl='xla'),
    moe=dataclasses.replace(m.moe, gmm_impl='scan'),
  )
  one = dataclasses.replace(
    cfg,
    model=model,
    train=dataclasses.replace(cfg.train, grad_accum=1),  # the accumulation loop counts once too
    mesh=schema.MeshConfig(shape=(1, 1, 1, 1)),
  )
  cpu = topology.Topology('cpu:1', 'cpu', tuple(jax.devices('cpu')[:1]), None)
  fns, batch = step_fns(one, cpu)
  with target_platform.compiling_for('cpu'):
    lowered = fns.train_step.lower(fns.abstract_state(), batch)
  return float(_first(lowered.cost_analysis()).get('flops', 0.0))


def _capacity(topo: topology.Topology) -> tuple[int | None, str]:
  if topo.chip is not None:
    return topo.chip.hbm_bytes, f'{topo.chip.name} HBM ({topo.chip.source})'
  ram = os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES')
  return ram // len(topo.devices), f'host RAM / {len(topo.devices)} devices (cpu)'


def _roofline(topo, cost, xla_flops, model_flops, comms) -> dict:
  """Step time at the chip's public peaks, between perfect overlap (the slowest of compute, HBM
  traffic and link traffic) and none (the slower of compute and HBM, plus link time), and the MFU each gives. Peaks
  are never reached, so both MFUs are upper bounds: an estimate, never a measurement."""
  chip, n = topo.chip, len(topo.devices)
  if chip is None:
    return {'note': 'no chip peaks for cpu topologies; GPU ahead-of-time compilation needs a GPU'}
  # XLA counts no FLOPs inside custom calls (splash attention, megablox): take the larger count.
  compute_s = max(xla_flops, model_flops) / n / chip.bf16_flops
  # XLA's bytes accessed count each loop body once (scanned layers): a lower bound on HBM time.
  memory_s = float(cost.get('bytes accessed', 0.0)) / chip.hbm_bytes_per_s
  link_s = comms.total_link_bytes() / chip.ici_bytes_per_s if chip.ici_bytes_per_s else None
  overlap_s = max(compute_s, memory_s, link_s or 0.0)
  serial_s = max(compute_s, memory_s) + (link_s or 0.0)
  mfu = lambda t: model_flops / (t * n * chip.bf16_flops)
  return {
    'kind': 'roofline estimate from public chip peaks; not a measurement',
    'compute_s': compute_s,
    'hbm_s_lower_bound': memory_s,
    'ici_s': link_s,
    'step_s_overlapped': overlap_s,
    'step_s_serial': serial_s,
    'mfu_upper_bound': mfu(overlap_s),
    'mfu_no_overlap': mfu(serial_s),
    'xla_optimal_seconds': cost.get('optimal_seconds'),
    'chip': dataclasses.asdict(chip),
  }


def _parameter_shardings(fns) -> list[str]:
  """'path shape -> spec' of every model variable, as the run shards it."""
  lines = []
  flat = jax.tree_util.tree_leaves_with_path(fns.abstract_state()['model'])
  for path, leaf in flat:
    where = '/'.join(str(getattr(k, 'key', k)) for k in path).removesuffix('/.value')
    spec = ', '.join('None' if p is None else repr(p) for p in leaf.sharding.spec)
    lines.append(f'{where} {tuple(leaf.shape)} -> ({spec})')
  return lines


def _count(n: float) -> str:
  return f'{n / 1e9:.2f}B' if n >= 1e9 else f'{n / 1e6:.1f}M'


def describe(report: dict) -> str:
  """The report in a few lines: memory against capacity, FLOPs, collectives, the estimate."""
  m, f, e = report['memory_per_device'], report['flops_per_step'], report['estimate']
  b = report['batch']
  mesh = ' x '.join(f'{k} {v}' for k, v in report['mesh'].items() if v > 1) or 'one device'
  lines = [
    f'{report["topology"]}: {report["devices"]} x {report["device_kind"]}, mesh {mesh}, '
    f'rules {report["rules"]}, batch {b["global"]} x {b["seq_len"]} ({b["per_device"]} rows per '
    f'device, grad_accum {b["grad_accum"]}), remat {report["remat"]}, '
    f'{_count(report["model_params"])} parameters ({_count(report["active_params_per_token"])} '
    'active per token)',
  ]
  state = (
    f'params {fmt_bytes(m["params"])}, optimizer {fmt_bytes(m["optimizer"])}, batch '
    f'{fmt_bytes(m["batch"])}'
  )
  if 'compiler_message' in report:  # refused by the compiler: its numbers
    lines.append(
      f'memory per device: {fmt_bytes(m["total"])} = {state} + temporaries '
      f'{fmt_bytes(m["xla_temporaries"])} (XLA refused to compile: {report["compiler_message"]})'
    )
  else:
    lines.append(
      f'memory per device (XLA buffer assignment): {fmt_bytes(m["total"])} = arguments '
      f'{fmt_bytes(m["xla_arguments"])} ({state}) + temporaries '
      f'{fmt_bytes(m["xla_temporaries"])} + outputs not aliased '
      f'{fmt_bytes(m["xla_outputs"] - m["xla_aliased"])} + code {fmt_bytes(m["xla_code"])}'
    )
  if m['capacity'] is not None:
    verdict = 'fits' if m['fits'] else 'does not fit'
    lines.append(
      f'  {verdict}: {fmt_bytes(m["total"])} needed of {fmt_bytes(m["capacity"])} '
      f'({m["capacity_source"]})'
    )
  if m.get('largest_arrays'):
    lines.append(
      '  largest arrays: '
      + ', '.join(f'{a["array"]} {fmt_bytes(a["bytes"])}' for a in m['largest_arrays'][:3])
    )
  ratio = f'{f["xla_over_model"]:.3f}' if f['xla_over_model'] else '-'
  lines.append(
    f'FLOPs per step: XLA {f["xla_cost_analysis"]:.3e} (the step unrolled, XLA kernels), model '
    f'{f["model"]:.3e}, ratio {ratio}'
    + ('' if f['comparable'] else ' (routed FFN: XLA counts its expert loop once, not comparable)')
  )
  coll = report['collectives_per_step']
  if coll is not None:
    used = [
      f'{k} {v["count"]}x {fmt_bytes(v["result_bytes"])}' for k, v in coll.items() if v['count']
    ]
    lines.append('collectives per step and device: ' + (', '.join(used) or 'none'))
  if 'compute_s' in e:
    ici = f'{e["ici_s"] * 1e3:.1f} ms' if e['ici_s'] is not None else 'unknown'
    lines.append(
      'estimate (roofline at public peaks, not a measurement): step '
      f'{e["step_s_overlapped"] * 1e3:.1f}-{e["step_s_serial"] * 1e3:.1f} ms (compute '
      f'{e["compute_s"] * 1e3:.1f} ms, ICI {ici}, HBM at least {e["hbm_s_lower_bound"] * 1e3:.1f} '
      f'ms), MFU at most {e["mfu_no_overlap"]:.2f}-{e["mfu_upper_bound"]:.2f}'
    )
  else:
    lines.append(e['note'])
  return '\n'.join(lines)
