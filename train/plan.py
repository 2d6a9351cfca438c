"""Plan a run for a device topology without its devices: compile the real train step ahead of time.

Usage: python -m train.plan --config=configs/NAME.py --topology=v5p:4x4x4 [--config.X=...]
       [--fit] [--out=FILE.json]

The step is `train.step.make_step_fns`'s jitted step, with the run's mesh rules and shardings,
lowered and compiled for the topology's devices (libtpu's compiler for TPU topologies; `cpu:N`
host devices otherwise) and never run. The report gives per-device memory from XLA's buffer
assignment against the chip's HBM, XLA's FLOP count beside the model's, the collectives by kind
with their bytes per step, and a roofline estimate of step time and MFU from the chip's public
peaks. Everything is ahead-of-time compilation and arithmetic, never a measurement.

`--fit` compiles remat policy x per-device batch x gradient accumulation (x expert-parallel size
for MoE configs) and names the largest global batch that fits. Exit status: 0 fits, 3 does not
fit (a result: "does not fit: X GiB needed of Y GiB"), 1 error, 2 bad flags.
"""

import os
import re
import sys

if __name__ == '__main__' and not os.environ.get('_ROUTED_PLAN_CHILD'):
  # libtpu's compiler may abort its process on a C++ check: plan in a child, report it in one line
  import subprocess

  _child = subprocess.run(
    [sys.executable, '-m', 'train.plan', *sys.argv[1:]],
    env={**os.environ, '_ROUTED_PLAN_CHILD': '1'},
    check=False,
  )
  if _child.returncode < 0:
    print(
      f'error: the compiler aborted (signal {-_child.returncode}) while compiling this step for '
      'the topology; its own message is above',
      file=sys.stderr,
    )
    sys.exit(1)
  sys.exit(_child.returncode)

if __name__ == '__main__':  # `cpu:N` needs N host devices, set before jax starts
  _n = [re.fullmatch(r'--topology=cpu:(\d+)', a) for a in sys.argv]
  _n = next((int(m.group(1)) for m in _n if m), 0)
  if _n:
    os.environ['XLA_FLAGS'] = (
      os.environ.get('XLA_FLAGS', '') + f' --xla_force_host_platform_device_count={_n}'
    )
    os.environ.setdefault('JAX_PLATFORMS', 'cpu')

import dataclasses  # noqa: E402
import math  # noqa: E402

from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from configs import cli, schema  # noqa: E402
from data import storage  # noqa: E402
from model.config import REMAT_POLICIES, ConfigError  # noqa: E402
from train import aot, topology  # noqa: E402
from train.memory import fmt_bytes  # noqa: E402

DOES_NOT_FIT = 3  # exit status of a plan whose config does not fit


@dataclasses.dataclass(frozen=True)
class FitRow:
  remat: str
  expert_parallel: int
  grad_accum: int
  per_device: int  # rows per device per micro-batch
  global_batch: int
  total: int | None  # bytes per device; None when it did not compile
  fits: bool
  step_s: float | None


def _with(cfg: schema.Config, remat, ep, accum, per_device, topo) -> schema.Config | None:
  """`cfg` at one point of the search; None when the expert axis cannot be `ep` here."""
  n = len(topo.devices)
  shape = list(cfg.mesh.resolved_shape(n))
  if ep != shape[3]:  # the expert axis trades devices with fsdp (or else data)
    i = next((i for i in (1, 0) if shape[i] * shape[3] % ep == 0), None)
    if i is None:
      return None
    shape[i], shape[3] = shape[i] * shape[3] // ep, ep
  rules = 'fsdp_ep' if ep > 1 else cfg.mesh.rules
  dp = math.prod(shape) // shape[2]
  return dataclasses.replace(
    cfg,
    model=dataclasses.replace(cfg.model, remat=remat),
    mesh=dataclasses.replace(cfg.mesh, shape=tuple(shape), rules=rules),
    train=dataclasses.replace(cfg.train, batch_size=per_device * dp * accum, grad_accum=accum),
  )


def fit(
  cfg: schema.Config,
  topo: topology.Topology,
  remats=('none', 'save_dots_no_batch', 'full'),
  accums=(1, 4),
  max_per_device: int = 256,
  log=print,
) -> list[FitRow]:
  """For each remat policy x grad accumulation (x expert-parallel size), the largest per-device
  micro-batch (a power of two) whose compiled step fits, found by doubling."""
  n = len(topo.devices)
  eps = [1]
  if cfg.moe.num_experts:
    eps = [e for e in (1, 2, 4, 8, 16, 32, 64) if e <= n and cfg.moe.num_experts % e == 0]
  rows = []
  for remat in remats:
    for ep in eps:
      for accum in accums:
        best, b = None, 1
        while b <= max_per_device:
          c = _with(cfg, remat, ep, accum, b, topo)
          if c is None:
            break
          try:
            report = aot.analyse(c, topo)
          except Exception as e:  # pylint: disable=broad-except  (this point cannot be planned)
            log(
              f'  {remat} ep {ep} accum {accum} x {b}: not planned ({str(e).splitlines()[0][:100]})'
            )
            break
          m = report['memory_per_device']
          row = FitRow(
            remat, ep, accum, b, c.train.batch_size, m['total'], m['fits'],
            report['estimate'].get('step_s_serial'),
          )  # fmt: skip
          log(f'  {remat} ep {ep} accum {accum} x {b}: {fmt_bytes(m["total"])}, fits {m["fits"]}')
          if not m['fits']:
            break
          best, b = row, b * 2
        rows.append(best or FitRow(remat, ep, accum, 1, 0, None, False, None))
  return rows


def describe_fit(rows: list[FitRow]) -> str:
  lines = ['remat               ep  accum  rows/device  global batch  memory/device  est. step*']
  for r in rows:
    mem = fmt_bytes(r.total) if r.total else '-'
    step = f'{r.step_s * 1e3:.1f} ms' if r.step_s else '-'
    batch = str(r.global_batch) if r.fits else 'none fits'
    lines.append(
      f'{r.remat:19s} {r.expert_parallel:2d}  {r.grad_accum:5d}  {r.per_device:11d}  '
      f'{batch:>12s}  {mem:>13s}  {step:>9s}'
    )
  lines.append('* roofline at public peaks, links not overlapped with compute: an estimate')
  fitting = [r for r in rows if r.fits]
  if fitting:
    best = max(fitting, key=lambda r: (r.global_batch, -(r.step_s or 0)))
    lines.append(
      f'largest global batch that fits: {best.global_batch} (remat {best.remat}, expert '
      f'parallel {best.expert_parallel}, grad_accum {best.grad_accum}, {best.per_device} rows '
      'per device per micro-batch)'
    )
  else:
    lines.append('nothing fits, even one row per device with full remat')
  return '\n'.join(lines)


def _main(argv, flag) -> int:
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  topo = topology.devices_for(flag['topology'].value)
  cfg = aot.load(cli.config_value(flag['config']), topo)
  report = aot.analyse(cfg, topo)
  report['config'] = config_flags.get_config_filename(flags.FLAGS['config'])
  report['command'] = ' '.join(['python -m train.plan'] + sys.argv[1:])
  print(aot.describe(report))
  print('parameter shardings (path, global shape -> partition spec):')
  print('\n'.join('  ' + line for line in report['parameters']))
  if flag['fit'].value:
    for r in flag['fit_remats'].value:
      if r not in REMAT_POLICIES:
        raise ConfigError(f'--fit_remats: {r!r} is not a remat policy; expected {REMAT_POLICIES}')
    for a in flag['fit_accums'].value:
      if not a.isdigit() or int(a) < 1:
        raise ConfigError(f'--fit_accums: {a!r} is not a positive integer')
    rows = fit(
      cfg,
      topo,
      remats=tuple(flag['fit_remats'].value),
      accums=tuple(int(a) for a in flag['fit_accums'].value),
      max_per_device=flag['fit_max_rows'].value,
    )
    print(describe_fit(rows))
    report['fit'] = [dataclasses.asdict(r) for r in rows]
  name = os.path.splitext(os.path.basename(report['config']))[0]  # local: the config file's name
  out = flag['out'].value or storage.join(
    'runs', 'plans', f'{name.replace(":", "-")}-{topo.name.replace(":", "-")}.json'
  )
  storage.write_json(out, report, indent=1)
  print(f'report: {out}')
  m = report['memory_per_device']
  if not m['fits']:
    print(
      f'does not fit: {fmt_bytes(m["total"])} needed of {fmt_bytes(m["capacity"])}',
      file=sys.stderr,
    )
    return DOES_NOT_FIT
  return 0


def run():
  flag = {
    'config': config_flags.DEFINE_config_file('config', None, 'Experiment config file.'),
    'topology': flags.DEFINE_string('topology', None, f'Devices to plan for: {topology.FORMS}.'),
    'fit': flags.DEFINE_bool('fit', False, 'Search remat x batch x accumulation (x EP) that fits.'),
    'fit_remats': flags.DEFINE_list(
      'fit_remats', 'none,save_dots_no_batch,full', '--fit: remat policies to try.'
    ),
    'fit_accums': flags.DEFINE_list('fit_accums', '1,4', '--fit: gradient accumulations to try.'),
    'fit_max_rows': flags.DEFINE_integer(
      'fit_max_rows', 256, '--fit: the largest per-device micro-batch tried (rows).'
    ),
    'out': flags.DEFINE_string(
      'out', '', 'JSON report, local or gs:// (default runs/plans/CONFIG-TOPOLOGY.json).'
    ),
  }
  flags.mark_flags_as_required(['config', 'topology'])

  def main(argv):
    try:
      sys.exit(_main(argv, flag))
    except ConfigError as e:
      print(f'error: {e}', file=sys.stderr)
      sys.exit(1)

  app.run(main, flags_parser=cli.parse_flags)


if __name__ == '__main__':
  run()
