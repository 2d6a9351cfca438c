"""What a compiled program communicates, read from its optimised HLO text (`compiled.as_text()`).

XLA places collectives inside fusions and loop bodies (on TPU as async collective fusions), so
each computation's collectives are counted once per execution: a while loop's body runs its trip
count times (`known_trip_count`, or the bound of its `counter < constant` condition).
"""

import collections
import dataclasses
import math
import re

KINDS = ('all-gather', 'reduce-scatter', 'all-reduce', 'all-to-all', 'collective-permute')
_DTYPE_BYTES = {
  'pred': 1, 's8': 1, 'u8': 1, 'f8e4m3fn': 1, 'f8e5m2': 1, 's16': 2, 'u16': 2, 'bf16': 2,
  'f16': 2, 's32': 4, 'u32': 4, 'f32': 4, 's64': 8, 'u64': 8, 'f64': 8, 'c64': 8, 'c128': 16,
}  # fmt: skip
_HEADER = re.compile(r'^(?:ENTRY )?%?([\w.\-]+) \(.*\{$')
_INSTR = re.compile(r'^\s*(?:ROOT )?%([\w.\-]+) = (.+?) ([a-z][\w\-]*)\((.*)$')
_ARRAY = re.compile(r'\b([a-z]+\d*(?:e\d+m\d+(?:fn)?)?)\[([\d,]*)\]')
_COLLECTIVE = re.compile(r'^(' + '|'.join(KINDS) + r'|ragged-all-to-all)(-start)?$')
_CALLS = re.compile(r'(?:calls|to_apply|body|condition|branch_computations)=\{?%([\w.\-]+)')
_EXTRA_CALLS = re.compile(r'branch_computations=\{([^}]*)\}')


def shape_bytes(shape: str) -> int:
  """Bytes of an HLO shape string (an array or a tuple of arrays; layouts ignored)."""
  total = 0
  for dtype, dims in _ARRAY.findall(shape):
    if dtype in _DTYPE_BYTES:
      total += _DTYPE_BYTES[dtype] * math.prod(int(d) for d in dims.split(',') if d)
  return total


def _group_size(line: str) -> int:
  """Devices in one replica group: {{0,2},{1,3}}, [G,S]<=[N] (iota) or mesh[...] {'axes'}."""
  m = re.search(r'replica_groups=mesh\[([^\]]*)\] \{([^}]*)\}', line)
  if m:
    sizes = dict(re.findall(r"'(\w+)'=(\d+)", m.group(1)))
    return math.prod(int(sizes[a]) for a in re.findall(r"'(\w+)'", m.group(2)))
  m = re.search(r'replica_groups=\[(\d+),(\d+)\]<=', line)
  if m:
    return int(m.group(2))
  m = re.search(r'replica_groups=\{\{([\d,]*)\}', line)
  if m:
    return len(m.group(1).split(','))
  return 0  # unknown (e.g. collective-permute's source_target_pairs)


@dataclasses.dataclass
class _Computation:
  calls: list  # (callee, times per execution)
  collectives: list  # (kind, result bytes, group size)
  constants: dict  # name -> integer value
  root_compare: tuple | None  # (lhs, rhs, direction) of a ROOT compare


def _parse(text: str) -> tuple[dict[str, _Computation], str]:
  comps, entry, current = {}, None, None
  for line in text.splitlines():
    header = _HEADER.match(line)
    if header:
      current = comps.setdefault(header.group(1), _Computation([], [], {}, None))
      if line.startswith('ENTRY'):
        entry = header.group(1)
      continue
    m = _INSTR.match(line) if current is not None else None
    if not m:
      continue
    name, shape, op, rest = m.groups()
    if op == 'constant':
      value = re.match(r'(-?\d+)\)', rest)
      if value:
        current.constants[name] = int(value.group(1))
    if op == 'compare' and line.lstrip().startswith('ROOT'):
      args = re.findall(r'%([\w.\-]+)', rest.split(')')[0])
      direction = re.search(r'direction=(\w+)', rest)
      if len(args) == 2 and direction:
        current.root_compare = (args[0], args[1], direction.group(1))
    kind = _COLLECTIVE.match(op)
    if kind:
      current.collectives.append((kind.group(1), shape_bytes(shape), _group_size(line)))
    if op == 'while':
      trips = re.search(r'"known_trip_count":\{"n":"(\d+)"', line)
      body = re.search(r'body=%([\w.\-]+)', line).group(1)
      cond = re.search(r'condition=%([\w.\-]+)', line).group(1)
      current.calls.append((body, int(trips.group(1)) if trips else ('cond', cond)))
      current.calls.append((cond, 1))
      continue
    callees = _CALLS.findall(rest)
    for group in _EXTRA_CALLS.findall(rest):
      callees += re.findall(r'%([\w.\-]+)', group)
    current.calls.extend((c, 1) for c in dict.fromkeys(callees))
  if entry is None:
    raise ValueError('no ENTRY computation in the HLO text')
  return comps, entry


def _trip_count(comps: dict, cond: str) -> int | None:
  """The bound of a `counter < constant` loop condition, or None when it is not of that form."""
  c = comps.get(cond)
  if c is None or c.root_compare is None:
    return None
  lhs, rhs, direction = c.root_compare
  if direction == 'LT' and rhs in c.constants:
    return c.constants[rhs]
  if direction == 'GT' and lhs in c.constants:
    return c.constants[lhs]
  return None


@dataclasses.dataclass(frozen=True)
class Collectives:
  """Per device and per execution of the program: how often each kind of collective runs, the
  bytes of its results, and the bytes each device sends over the links for it (ring
  algorithms: all-gather and all-to-all (n-1)/n of the result, reduce-scatter (n-1) times the
  result, all-reduce 2(n-1)/n, collective-permute all of it)."""

  count: dict  # kind -> executions
  result_bytes: dict  # kind -> bytes
  link_bytes: dict  # kind -> bytes sent per device
  unknown_loops: int  # while loops whose trip count was not found (counted once)

  def total_link_bytes(self) -> int:
    return sum(self.link_bytes.values())


def _link_bytes(kind: str, size: int, n: int) -> float:
  if n <= 1:
    return 0.0 if kind != 'collective-permute' else float(size)
  return {
    'all-gather': size * (n - 1) / n,
    'all-to-all': size * (n - 1) / n,
    'ragged-all-to-all': size * (n - 1) / n,
    'reduce-scatter': size * (n - 1),
    'all-reduce': 2 * size * (n - 1) / n,
  }.get(kind, float(size))


def collectives(hlo_text: str) -> Collectives:
  """The collectives of a compiled program's HLO text, each counted per execution of the program."""
  comps, entry = _parse(hlo_text)
  times = collections.Counter({entry: 1})
  unknown = 0
  order, seen = [entry], {entry}
  i = 0
  while i < len(order):  # breadth first: callers before callees in this tree of calls
    for callee, n in comps[order[i]].calls if order[i] in comps else ():
      if isinstance(n, tuple):
        found = _trip_count(comps, n[1])
        unknown += found is None
        n = found or 1
      times[callee] += times[order[i]] * n
      if callee not in seen:
        seen.add(callee)
        order.append(callee)
    i += 1
  count, result, link = collections.Counter(), collections.Counter(), collections.Counter()
  for name, c in comps.items():
    for kind, size, group in c.collectives:
      kind = 'all-to-all' if kind == 'ragged-all-to-all' else kind
      count[kind] += times[name]
      result[kind] += times[name] * size
      link[kind] += times[name] * _link_bytes(kind, size, group)
  return Collectives(dict(count), dict(result), {k: int(v) for k, v in link.items()}, unknown)


def largest_arrays(hlo_text: str, top: int = 5) -> list[tuple[str, int]]:
  """The largest array results in the program (per device): (op name and shape, bytes). Buffers
  XLA may hold live at once; which of them coexist is XLA's buffer assignment, not shown here."""
  sizes = {}
  for line in hlo_text.splitlines():
    m = _INSTR.match(line)
    if m and m.group(3) not in ('parameter', 'tuple', 'get-tuple-element', 'bitcast', 'while'):
      arrays = _ARRAY.findall(m.group(2))
      if len(arrays) == 1:  # one entry per shape, named by the first op that makes it
        shape = f'{arrays[0][0]}[{arrays[0][1]}]'
        sizes.setdefault(shape, (f'{shape} ({m.group(3)})', shape_bytes(m.group(2))))
  return sorted(sizes.values(), key=lambda kv: -kv[1])[:top]
