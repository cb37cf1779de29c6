"""What a compiled program communicates: the collectives in its HLO text.

`collectives(hlo_text, mesh)` lists every all-gather, all-reduce,
reduce-scatter, all-to-all and collective-permute with its dtype, shape, the
mesh axes its groups span, how many times it runs per call (the trip counts
of the while loops around it multiplied together) and the bytes each device
sends per run under ring algorithms:

  all-reduce        2 (n - 1) / n x S     (S: the array's bytes)
  all-gather        (n - 1) / n x S       (S: the gathered result)
  reduce-scatter    (n - 1) / n x S       (S: the input, n x the result)
  all-to-all        (n - 1) / n x S
  collective-permute S on devices that send to another device

It reads both the HLO right after SPMD partitioning (`partitioned_hlo`, what
the partitioner decided, before backend passes combine or rewrite
collectives) and `compiled.as_text()` (what runs). Tests assert on it, and
benchmarks/collectives.py prints tables from it.
"""
import dataclasses
import math
import pathlib
import re
import tempfile

import numpy as np

KINDS = ('all-reduce', 'all-gather', 'reduce-scatter', 'all-to-all', 'collective-permute')
_BYTES = {'pred': 1, 's8': 1, 'u8': 1, 's16': 2, 'u16': 2, 'f16': 2, 'bf16': 2, 's32': 4, 'u32': 4,
          'f32': 4, 's64': 8, 'u64': 8, 'f64': 8, 'f8e4m3fn': 1, 'f8e5m2': 1}
_ARRAY = re.compile(r'\b(' + '|'.join(_BYTES) + r')\[([\d,]*)\]')
_INSTRUCTION = re.compile(r'^\s*(?:ROOT\s+)?%?(\S+)\s*=\s*(.*?)\s+(' + '|'.join(KINDS) +
                          r')(-start)?\((.*)$')
_COMPUTATION = re.compile(r'^(?:ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$')


@dataclasses.dataclass(frozen=True)
class Collective:
  kind: str
  name: str
  dtype: str  # of the largest array it moves
  shapes: tuple  # every array it moves (one per operand of a combined collective)
  axes: tuple  # mesh axes its groups span, or ('?',) when unknown
  group_size: int
  runs: int  # per call of the program: the product of the enclosing loops' trip counts
  loops: tuple  # names of the enclosing while loops, outermost first
  bytes_sent: float  # per device, per run
  op_name: str  # jax's op_name metadata: which part of the program it came from

  @property
  def total_bytes(self) -> float:
    return self.runs * self.bytes_sent


def _iota(spec: str) -> np.ndarray:
  """'[2,4]<=[8]', '[4,2]<=[2,2,2]T(0,2,1)' or '[2,4]T(1,0)' -> the device-id array it names."""
  match = re.fullmatch(r'\[([\d,]+)\](?:<=\[([\d,]+)\])?(?:T\(([\d,]+)\))?', spec.strip())
  if not match:
    raise ValueError(f'unknown device-id list {spec!r}')
  dims = [int(d) for d in match[1].split(',')]
  source = [int(d) for d in match[2].split(',')] if match[2] else dims
  ids = np.arange(math.prod(source)).reshape(source)
  if match[3]:
    ids = ids.transpose([int(p) for p in match[3].split(',')])
  return ids.reshape(dims)


def replica_groups(text: str) -> list[list[int]] | None:
  """The groups of device (partition) ids of a collective's attributes, in any of HLO's spellings."""
  match = re.search(r"replica_groups=mesh\[([^\]]*)\](?:,\s*device_ids=\(([^)]*\)?)\))?\s*\{([^}]*)\}", text)
  if match:  # mesh['axis_0'=2,'axis_1'=4], device_ids=(...) {'axis_1'}: groups along the named axes
    names, sizes = zip(*((n.strip(" '"), int(s)) for n, s in
                         (item.split('=') for item in match[1].split(','))))
    ids = _iota(match[2]) if match[2] else np.arange(math.prod(sizes))
    ids = ids.reshape(sizes)
    along = [names.index(n.strip(" '")) for n in match[3].split(',') if n.strip()]
    rest = [i for i in range(len(sizes)) if i not in along]
    return ids.transpose(rest + along).reshape(-1, math.prod(sizes[i] for i in along)).tolist()
  match = re.search(r'replica_groups=(\[[\d,]+\]<=\[[\d,]+\](?:T\([\d,]+\))?)', text)
  if match:
    return _iota(match[1]).reshape(-1, _iota(match[1]).shape[-1]).tolist()
  match = re.search(r'replica_groups=\{((?:\{[\d,]*\},?)*)\}', text)
  if match:
    return [[int(i) for i in g.split(',') if i] for g in re.findall(r'\{([\d,]*)\}', match[1])]
  return None


def _axes_of(groups, mesh_shape: dict) -> tuple:
  """The mesh axes along which the devices of a group differ (partition id = mesh position)."""
  if not groups or not mesh_shape:
    return ('?',)
  coords = np.array(np.unravel_index(np.array(groups[0]), tuple(mesh_shape.values()))).T
  return tuple(axis for i, axis in enumerate(mesh_shape)
               if len(set(coords[:, i])) > 1)


def _arrays(type_text: str) -> list[tuple[str, tuple[int, ...]]]:
  return [(dtype, tuple(int(d) for d in dims.split(',') if d))
          for dtype, dims in _ARRAY.findall(type_text)]


def _nbytes(arrays) -> int:
  return sum(_BYTES[dtype] * math.prod(shape) for dtype, shape in arrays)


def _split_computations(hlo_text: str) -> tuple[dict[str, list[str]], str]:
  computations, entry, current = {}, None, None
  for line in hlo_text.splitlines():
    match = _COMPUTATION.match(line)
    if match and not line.startswith(' '):
      current = match[1]
      computations[current] = []
      if line.startswith('ENTRY'):
        entry = current
    elif current is not None:
      if line.strip() == '}':
        current = None
      else:
        computations[current].append(line)
  if entry is None:
    raise ValueError('no ENTRY computation in the HLO text')
  return computations, entry


def _trip_count(while_line: str, condition: list[str]) -> int:
  match = re.search(r'"known_trip_count":\{"n":"(\d+)"', while_line)
  if match:
    return int(match[1])
  # Before optimisation passes annotate it: scan's condition is `i < N` with N a constant.
  constants = [int(m) for line in condition for m in re.findall(r'constant\((\d+)\)', line)]
  if len(constants) == 1 and any('direction=LT' in line for line in condition):
    return constants[0]
  raise ValueError(f'cannot tell the trip count of: {while_line.strip()[:200]}')


def collectives(hlo_text: str, mesh_shape: dict | None = None) -> list[Collective]:
  """Every collective reachable from the entry computation, with how often it runs.

  mesh_shape: {axis: size} of the mesh the program was partitioned for, in
  mesh order; it names the axes each collective spans.
  """
  computations, entry = _split_computations(hlo_text)
  found: list[Collective] = []

  def visit(name: str, runs: int, loops: tuple):
    for line in computations.get(name, ()):
      match = re.search(r'\bwhile\(.*condition=%?([\w.\-]+), body=%?([\w.\-]+)', line)
      if match:
        count = _trip_count(line, computations.get(match[1], []))
        loop = re.match(r'^\s*(?:ROOT\s+)?%?(\S+)', line)[1]
        visit(match[2], runs * count, loops + (loop,))
        continue
      for callee in re.findall(r'(?:calls|to_apply|true_computation|false_computation)=%?([\w.\-]+)', line):
        visit(callee, runs, loops)
      branches = re.search(r'branch_computations=\{([^}]*)\}', line)
      if branches:
        for callee in re.findall(r'%?([\w.\-]+)', branches[1]):
          visit(callee, runs, loops)
      instruction = _INSTRUCTION.match(line)
      if instruction:
        found.append(_collective(instruction, line, runs, loops, mesh_shape))

  visit(entry, 1, ())
  return found


def _collective(match, line: str, runs: int, loops: tuple, mesh_shape) -> Collective:
  name, type_text, kind, started = match[1], match[2], match[3], bool(match[4])
  arrays = _arrays(type_text)
  if started and kind in ('all-gather', 'collective-permute') and len(arrays) > 1:
    arrays = arrays[len(arrays) // 2:]  # the -start tuple holds (operands, results)
  size = _nbytes(arrays)
  op_name = re.search(r'op_name="([^"]*)"', line)
  if kind == 'collective-permute':
    pairs = re.findall(r'\{(\d+),(\d+)\}', re.search(r'source_target_pairs=\{(.*?)\}\}', line)[0])
    moving = [(int(s), int(t)) for s, t in pairs if s != t]
    group = sorted({d for pair in moving for d in pair})
    axes = _axes_of([group], mesh_shape) if moving else ()
    return Collective(kind, name, _dtype(arrays), tuple(s for _, s in arrays), axes,
                      len(group), runs, loops, float(size if moving else 0),
                      op_name[1] if op_name else '')
  groups = replica_groups(line)
  n = len(groups[0]) if groups else 1
  factor = {'all-reduce': 2 * (n - 1) / n, 'all-gather': (n - 1) / n,
            'reduce-scatter': (n - 1), 'all-to-all': (n - 1) / n}[kind]  # reduce-scatter: S = n x result
  return Collective(kind, name, _dtype(arrays), tuple(s for _, s in arrays), _axes_of(groups, mesh_shape),
                    n, runs, loops, factor * size, op_name[1] if op_name else '')


def _dtype(arrays) -> str:
  return max(arrays, key=lambda a: _BYTES[a[0]] * math.prod(a[1]))[0] if arrays else '?'


def compile_with_partitioned_hlo(lowered, dump_dir: str | None = None):
  """(compiled, HLO text right after SPMD partitioning) for a jax `Lowered`."""
  with tempfile.TemporaryDirectory() as tmp:
    folder = pathlib.Path(dump_dir or tmp)
    compiled = lowered.compile(compiler_options={
        'xla_dump_to': str(folder), 'xla_dump_hlo_pass_re': 'spmd-partitioning'})
    dumps = sorted(folder.glob('*after_spmd-partitioning*.txt'), key=lambda p: p.stat().st_mtime)
    if not dumps:
      raise RuntimeError(f'XLA wrote no SPMD-partitioning dump into {folder}')
    return compiled, dumps[-1].read_text()


def summarize(found: list[Collective]) -> dict[str, float]:
  """{kind: bytes each device sends per call} over the collectives found."""
  totals = dict.fromkeys(KINDS, 0.0)
  for c in found:
    totals[c.kind] += c.total_bytes
  return totals
