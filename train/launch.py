"""Runs a command as several local processes of one multi-process JAX run.

`python -m train.launch --num_processes=2 [--devices_per_process=4] -- python -m train.train ...`

Each process gets ROUTED_COORDINATOR_ADDRESS / ROUTED_NUM_PROCESSES / ROUTED_PROCESS_ID (read by
`train.distributed.initialize`) and, with `--devices_per_process`, that many CPU devices. Output
lines are prefixed with the process index. When a process fails, the others get `--grace`
seconds to stop by themselves (they report the failed process's error, see
`train.distributed.peer_errors`) and are then killed; the launcher exits with the first failure's
code. This is how to try the pod-slice path on one machine; on a cluster the scheduler starts the
processes (README, "Pod slices and clusters").
"""

import os
import socket
import subprocess
import sys
import threading
import time

from absl import app, flags

from train import distributed

_NUM = flags.DEFINE_integer('num_processes', 2, 'Processes to start.')
_DEVICES = flags.DEFINE_integer(
  'devices_per_process', 0, 'CPU devices per process (0: leave the platform as it is).'
)
_PORT = flags.DEFINE_integer('port', 0, 'Coordinator port on localhost (0: a free one).')
_GRACE = flags.DEFINE_float('grace', 30.0, 'Seconds the other processes get after a failure.')


def free_port() -> int:
  with socket.socket() as s:
    s.bind(('localhost', 0))
    return s.getsockname()[1]


def process_env(index: int, count: int, port: int, devices: int) -> dict:
  env = dict(
    os.environ,
    **{
      distributed.ENV['coordinator_address']: f'localhost:{port}',
      distributed.ENV['num_processes']: str(count),
      distributed.ENV['process_id']: str(index),
    },
  )
  if devices:
    env['JAX_PLATFORMS'] = 'cpu'
    env['XLA_FLAGS'] = (
      env.get('XLA_FLAGS', '') + f' --xla_force_host_platform_device_count={devices}'
    ).strip()
  return env


def _pump(stream, prefix: str, out, last_error: list) -> None:
  for line in iter(stream.readline, ''):
    if line.startswith('error:'):
      last_error[0] = line.strip()
    out.write(prefix + line)
    out.flush()


def launch(
  command: list[str],
  num_processes: int,
  devices_per_process: int = 0,
  port: int = 0,
  grace: float = 30.0,
) -> int:
  """Runs `command` as `num_processes` processes; returns 0 or the first failure's exit code."""
  port = port or free_port()
  procs, errors, threads = [], [], []
  for i in range(num_processes):
    p = subprocess.Popen(
      command,
      env=process_env(i, num_processes, port, devices_per_process),
      stdout=subprocess.PIPE,
      stderr=subprocess.STDOUT,
      text=True,
      bufsize=1,
    )
    errors.append([''])
    t = threading.Thread(
      target=_pump, args=(p.stdout, f'[p{i}] ', sys.stdout, errors[-1]), daemon=True
    )
    t.start()
    procs.append(p)
    threads.append(t)
  failed, deadline = None, None
  while any(p.poll() is None for p in procs):
    if failed is None:
      failed = next((i for i, p in enumerate(procs) if p.poll() not in (None, 0)), None)
      if failed is not None:
        deadline = time.monotonic() + grace
    if deadline is not None and time.monotonic() > deadline:
      for p in procs:
        if p.poll() is None:
          p.kill()
    time.sleep(0.2)
  for t in threads:
    t.join(timeout=5)
  if failed is None:
    failed = next((i for i, p in enumerate(procs) if p.returncode != 0), None)
  if failed is None:
    return 0
  message = errors[failed][0] or f'exit code {procs[failed].returncode}'
  print(f'launch: process {failed} failed first: {message}', file=sys.stderr)
  code = procs[failed].returncode
  return code if code > 0 else 1


def main(argv):
  command = argv[1:]
  if command and command[0] == '--':
    command = command[1:]
  if not command:
    raise app.UsageError('give the command after --, e.g. -- python -m train.train --config=...')
  sys.exit(launch(command, _NUM.value, _DEVICES.value, _PORT.value, _GRACE.value))


if __name__ == '__main__':
  app.run(main)
