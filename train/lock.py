"""One trainer per workdir: a lock file naming its holder (host, pid, start time).

`python -m train.train` takes the lock of its workdir before touching anything in it and gives it
back when it ends. A second trainer on the same workdir is refused in one line naming the holder,
and the first is unharmed. A stale lock (its holder is no longer running on this host, e.g. after
kill -9) is taken over with a warning. A lock held from another host cannot be checked from here:
it is refused, and the message says which file to remove once that run is known to be gone. On a
pod slice the lock belongs to the run: only process 0 takes it.
"""

import json
import os
import socket
import time

from absl import logging

LOCK_NAME = 'train.lock'


class WorkdirLocked(RuntimeError):
  """Another trainer holds the workdir."""


def _alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:  # exists, owned by someone else
    return True
  return True


def _holder(path: str) -> dict:
  try:
    with open(path) as f:
      return json.load(f)
  except (OSError, ValueError):
    return {}  # half-written or unreadable: treated as stale below (no live pid to protect)


class WorkdirLock:
  """`with WorkdirLock(workdir):` holds the workdir for this process (see the module docstring)."""

  def __init__(self, workdir: str, *, enabled: bool = True):
    self.path = os.path.join(workdir, LOCK_NAME)
    self.enabled = enabled
    self.me = {
      'host': socket.gethostname(),
      'pid': os.getpid(),
      'started': time.strftime('%Y-%m-%dT%H:%M:%S%z'),
    }

  def __enter__(self) -> 'WorkdirLock':
    if not self.enabled:
      return self
    os.makedirs(os.path.dirname(self.path), exist_ok=True)
    for _ in range(2):  # second try after removing a stale lock
      try:
        fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
      except FileExistsError:
        holder = _holder(self.path)
        same_host = holder.get('host') == self.me['host']
        if holder and (not same_host or _alive(int(holder.get('pid', -1)))):
          where = 'this host' if same_host else f'host {holder.get("host")}'
          raise WorkdirLocked(
            f'{os.path.dirname(self.path)} is in use by pid {holder.get("pid")} on {where} since '
            f'{holder.get("started")} ({self.path}); wait for it, stop it, or use another '
            f'--workdir{"" if same_host else " (remove the lock file if that run is gone)"}'
          )
        logging.warning(
          'taking over the stale lock %s (holder %s is not running)', self.path, holder or 'unknown'
        )
        os.remove(self.path)
        continue
      with os.fdopen(fd, 'w') as f:
        json.dump(self.me, f)
      return self
    raise WorkdirLocked(f'{self.path}: could not take the lock (another trainer raced for it)')

  def __exit__(self, *exc) -> None:
    if self.enabled and _holder(self.path).get('pid') == self.me['pid']:
      os.remove(self.path)
