"""One trainer per workdir: a lock file naming its holder (host, pid, start time).

`python -m train.train` takes the lock of its workdir before touching anything in it and gives it
back when it ends. A second trainer on the same workdir is refused in one line naming the holder,
and the first is unharmed. A stale lock (its holder is no longer running on this host, e.g. after
kill -9) is taken over with a warning. A lock held from another host cannot be checked from here:
it is refused, and the message says which file to remove once that run is known to be gone. On a
pod slice the lock belongs to the run: only process 0 takes it. On a bucket the lock is an object
created with the precondition "does not exist yet" (`storage.create_exclusive`), so the same rules
hold there.
"""

import json
import os
import socket
import time

from absl import logging

from data import storage

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
    return storage.read_json(path)
  except (OSError, ValueError):
    return {}  # half-written or unreadable: treated as stale below (no live pid to protect)


class WorkdirLock:
  """`with WorkdirLock(workdir):` holds the workdir for this process (see the module docstring)."""

  def __init__(self, workdir: str, *, enabled: bool = True):
    self.workdir = storage.resolve(workdir)
    self.path = storage.join(self.workdir, LOCK_NAME)
    self.enabled = enabled
    self.me = {
      'host': socket.gethostname(),
      'pid': os.getpid(),
      'started': time.strftime('%Y-%m-%dT%H:%M:%S%z'),
    }

  def __enter__(self) -> 'WorkdirLock':
    if not self.enabled:
      return self
    for _ in range(2):  # second try after removing a stale lock
      if not storage.create_exclusive(self.path, json.dumps(self.me).encode()):
        holder = _holder(self.path)
        same_host = holder.get('host') == self.me['host']
        if holder and (not same_host or _alive(int(holder.get('pid', -1)))):
          where = 'this host' if same_host else f'host {holder.get("host")}'
          raise WorkdirLocked(
            f'{self.workdir} is in use by pid {holder.get("pid")} on {where} since '
            f'{holder.get("started")} ({self.path}); wait for it, stop it, or use another '
            f'--workdir{"" if same_host else " (remove the lock file if that run is gone)"}'
          )
        logging.warning(
          'taking over the stale lock %s (holder %s is not running)', self.path, holder or 'unknown'
        )
        storage.remove(self.path)
        continue
      return self
    raise WorkdirLocked(f'{self.path}: could not take the lock (another trainer raced for it)')

  def __exit__(self, *exc) -> None:
    if self.enabled and _holder(self.path).get('pid') == self.me['pid']:
      storage.remove(self.path)
