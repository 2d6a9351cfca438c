"""The line protocol between benchmarks/peer_step.py and its timing workers (standard library only,
so that the torch worker in .venv-hf imports it as well as the JAX worker).

A worker warms up, writes one JSON line saying it is ready, then answers each {"steps": n} line
on stdin with {"times": [wall seconds of each of n steps]} until {"quit": true}.
"""

import json
import os
import sys
from collections.abc import Callable


def protocol_stream():
  """The worker's protocol stream (its original stdout); anything else printed goes to stderr."""
  proto = os.fdopen(os.dup(1), 'w')
  os.dup2(2, 1)
  return proto


def serve(proto, ready: dict, time_steps: Callable[[int], list[float]]) -> None:
  """Says `ready`, then answers {"steps": n} requests with `time_steps(n)` until told to quit."""
  proto.write(json.dumps(ready) + '\n')
  proto.flush()
  for line in sys.stdin:
    msg = json.loads(line)
    if msg.get('quit'):
      return
    proto.write(json.dumps({'times': time_steps(int(msg['steps']))}) + '\n')
    proto.flush()
