"""Ahead-of-time compilation for a TPU slice, from any host: fit, memory, the compiler's estimate.

With `libtpu` installed (`pip install -e '.[tpu]'`), `jax.experimental.topologies` describes a
TPU slice as compile-only devices on a CPU-only machine. A mesh over them, the train state and
batch as sharded `jax.ShapeDtypeStruct`s and `jitted.lower(...).compile()` compile the very
program the slice would run (MaxText's `train_compile.py` does the same). This module turns a
slice name into those devices and a compiled program into a report:

  * memory per chip (`memory_analysis()`): arguments, outputs, temporaries, generated code, and
    their total against the chip's HBM; a program that does not fit fails to compile with
    RESOURCE_EXHAUSTED, as it would on the slice, and is reported as not fitting;
  * the compiler's cost model (`cost_analysis()`): FLOPs, bytes accessed and `optimal_seconds`,
    the compiler's own estimate of the step time. It is an ESTIMATE (a roofline over the
    program's operations), never a measurement;
  * the collectives of the compiled program (all-gather, reduce-scatter, all-reduce,
    all-to-all, collective-permute): how many and how many bytes they produce per chip.

A loop body (a `lax.scan`: `model.scan=True`, or gradient accumulation's scan over
micro-batches) is counted ONCE by the cost model, so a scanned model's FLOPs, estimate and
collectives would be ~depth times too small. `extrapolate_depth` corrects them from two small
unrolled compiles (depth 1 and 2): every per-block quantity is linear in the depth, so
cost(L) = cost(1) + (L - 1) * (cost(2) - cost(1)); for ViT-H/14 on 8 v5p chips this is within
0.2 % of the unrolled program's own estimate. (`compile.py` costs accumulation from one
micro-batch's step.)

The chip table (`CHIPS`) is the one place that holds HBM capacities and peaks.
"""

from __future__ import annotations

import dataclasses
import os
import re
import time
from typing import Any

import jax

GIB = 2**30


@dataclasses.dataclass(frozen=True)
class Chip:
  """One TPU generation as a user rents it."""
  name: str                # The generation as users type it: 'v5p'.
  device_kind: str         # What jax reports for its devices.
  hbm_gib: float           # HBM per chip (one jax device per chip: v4 / v5p run as megacore).
  peak_tflops: float       # Dense bf16 TFLOP/s per chip (data sheet).
  dims: int                # 3: a 3-D torus (v4, v5p); 2: a 2-D mesh (v5e, v6e).
  cores_per_chip: int      # TensorCores per chip: Cloud's slice names count cores on v4 / v5p.


# Cloud TPU data sheets (HBM per chip, peak bf16 per chip).
CHIPS = {
    'v4': Chip('v4', 'TPU v4', 32.0, 275.0, 3, 2),
    'v5e': Chip('v5e', 'TPU v5 lite', 16.0, 197.0, 2, 1),
    'v5p': Chip('v5p', 'TPU v5', 95.0, 459.0, 3, 2),
    'v6e': Chip('v6e', 'TPU v6 lite', 32.0, 918.0, 2, 1),
}
_ALIASES = {'v5litepod': 'v5e', 'v5lite': 'v5e', 'v6litepod': 'v6e'}

# The slice shapes Cloud TPU provisions, by chip count (smallest dimension first).
_SHAPES_3D = {4: (2, 2, 1), 8: (2, 2, 2), 16: (2, 2, 4), 32: (2, 4, 4), 64: (4, 4, 4),
              128: (4, 4, 8), 256: (4, 8, 8), 512: (8, 8, 8), 1024: (8, 8, 16),
              2048: (8, 16, 16), 4096: (16, 16, 16)}
_SHAPES_2D = {1: (1, 1), 4: (2, 2), 8: (2, 4), 16: (4, 4), 32: (4, 8), 64: (8, 8),
              128: (8, 16), 256: (16, 16)}


@dataclasses.dataclass(frozen=True)
class Slice:
  """A TPU slice (or several identical slices, multi-slice over the data-centre network)."""
  chip: Chip
  shape: tuple[int, ...]   # Chips along each axis of one slice.
  num_slices: int = 1

  @property
  def chips_per_slice(self) -> int:
    n = 1
    for d in self.shape:
      n *= d
    return n

  @property
  def num_chips(self) -> int:
    return self.chips_per_slice * self.num_slices

  @property
  def topology_name(self) -> str:
    """libtpu's name of one slice: 'v5p:2x2x4'."""
    return f'{self.chip.name}:' + 'x'.join(map(str, self.shape))

  @property
  def cloud_name(self) -> str:
    """Cloud's accelerator type: 'v5p-32' (TensorCores on v4 / v5p, chips on v5e / v6e)."""
    name = f'{self.chip.name}-{self.chips_per_slice * self.chip.cores_per_chip}'
    return name if self.num_slices == 1 else f'{self.num_slices}x {name}'


def parse_slice(name: str, num_slices: int = 1) -> Slice:
  """'v5p-32', 'v5e-16', 'v5litepod-16', 'v4-8', 'v6e-64' or 'v5p:2x2x4' -> `Slice`.

  Raises:
    ValueError naming the accepted forms.
  """
  forms = ("use Cloud's accelerator type (v4-32, v5e-16, v5p-128, v6e-64: the number counts "
           'TensorCores on v4 / v5p and chips on v5e / v6e) or the topology form (v5p:2x2x4)')
  if not isinstance(num_slices, int) or num_slices < 1:
    raise ValueError(f'--num_slices={num_slices!r} is invalid: must be an integer >= 1.')
  m = re.fullmatch(r'(v\d+[a-z]*)(?:-(\d+)|:(\d+(?:x\d+)+))', name.strip().lower())
  if not m:
    raise ValueError(f'--topology={name!r} is not a TPU slice name: {forms}.')
  gen = _ALIASES.get(m.group(1), m.group(1))
  if gen not in CHIPS:
    raise ValueError(f'--topology={name!r}: unknown TPU generation {m.group(1)!r}; known: '
                     f'{", ".join(CHIPS)}.')
  chip = CHIPS[gen]
  if m.group(3):
    shape = tuple(int(d) for d in m.group(3).split('x'))
    if len(shape) != chip.dims:
      raise ValueError(f'--topology={name!r}: a {gen} slice has {chip.dims} dimensions (e.g. '
                       f'{gen}:{"x".join(["2"] * chip.dims)}).')
  else:
    count = int(m.group(2))
    if count % chip.cores_per_chip:
      raise ValueError(f'--topology={name!r}: {gen}-N counts TensorCores ({chip.cores_per_chip} '
                       f'per chip), so N must be a multiple of {chip.cores_per_chip}.')
    chips = count // chip.cores_per_chip
    shapes = _SHAPES_3D if chip.dims == 3 else _SHAPES_2D
    if chips not in shapes:
      sizes = ', '.join(f'{gen}-{c * chip.cores_per_chip}' for c in shapes)
      raise ValueError(f'--topology={name!r}: no {gen} slice of {chips} chips is provisioned; '
                       f'use one of {sizes}, or the topology form ({gen}:AxB...).')
    shape = shapes[chips]
  return Slice(chip, shape, num_slices)


def check_libtpu() -> None:
  """One line naming the extra when libtpu (the TPU compiler) is not installed."""
  try:
    import libtpu  # pylint: disable=g-import-not-at-top,unused-import
  except ImportError as e:
    raise ValueError("compiling for a TPU slice needs libtpu, the TPU compiler: pip install -e "
                     "'.[tpu]' (it installs the libtpu that matches the installed jax).") from e


def slice_devices(tpu_slice: Slice) -> list[Any]:
  """Compile-only devices of the slice (no TPU needed; the host's own backend is untouched)."""
  check_libtpu()
  # libtpu looks for a TPU VM's metadata when it loads: say there is no pod to find, or it
  # prints a multi-line error on every start.
  os.environ.setdefault('TPU_WORKER_HOSTNAMES', 'localhost')
  # libtpu lets one process at a time own the TPUs (/tmp/libtpu_lockfile); compile-only devices
  # own nothing, so several compiles (or a test and a compile) may run side by side.
  os.environ.setdefault('ALLOW_MULTIPLE_LIBTPU_LOAD', '1')
  os.environ.setdefault('TPU_ACCELERATOR_TYPE', f'{tpu_slice.chip.name}-{tpu_slice.chip.cores_per_chip}')
  from jax.experimental import topologies  # pylint: disable=g-import-not-at-top
  topo = topologies.get_topology_desc(platform='tpu', topology_name=tpu_slice.topology_name,
                                      num_slices=tpu_slice.num_slices)
  return list(topo.devices)


# ------------------------------------------------------------------------------------------------
# Reading a compiled program.
# ------------------------------------------------------------------------------------------------

COLLECTIVES = ('all-gather', 'reduce-scatter', 'all-reduce', 'all-to-all', 'collective-permute')
_DTYPE_BYTES = {'pred': 1, 's4': 0.5, 'u4': 0.5, 's8': 1, 'u8': 1, 'f8e4m3fn': 1, 'f8e5m2': 1,
                'bf16': 2, 'f16': 2, 's16': 2, 'u16': 2, 'f32': 4, 's32': 4, 'u32': 4, 'f64': 8,
                's64': 8, 'u64': 8, 'c64': 8, 'c128': 16}
# `%name = SHAPE op(` where op is a collective, synchronous or the `-done` half of an async pair
# (whose result is the collective's output; the `-start` half is not counted again).
_OP = re.compile(r'^\s*(?:ROOT\s+)?%?[\w.\-]+\s*=\s*(.+?)\s+(' + '|'.join(COLLECTIVES) +
                 r')(-done)?\(')
_ARRAY = re.compile(r'\b(' + '|'.join(_DTYPE_BYTES) + r')\[([\d,]*)\]')


def _shape_bytes(shape: str) -> float:
  total = 0.0
  for dtype, dims in _ARRAY.findall(shape):
    n = 1
    for d in dims.split(','):
      if d:
        n *= int(d)
    total += n * _DTYPE_BYTES[dtype]
  return total


def collectives(hlo_text: str) -> dict[str, dict[str, float]]:
  """{kind: {'count', 'bytes'}} of the collectives in a compiled program's HLO text (per chip:
  the output bytes of each op). Ops inside a loop body are counted once (see the module doc)."""
  out = {k: {'count': 0, 'bytes': 0.0} for k in COLLECTIVES}
  for line in hlo_text.splitlines():
    m = _OP.match(line)
    if not m:
      continue
    entry = out[m.group(2)]
    entry['count'] += 1
    entry['bytes'] += _shape_bytes(m.group(1))
  return out


@dataclasses.dataclass
class Compiled:
  """What one ahead-of-time compile says about a program, per chip."""
  fits: bool
  compile_seconds: float
  memory: dict[str, float]          # Bytes: arguments, outputs, aliased, temporaries, code, total.
  cost: dict[str, float]            # flops, bytes_accessed, optimal_seconds (the estimate).
  collectives: dict[str, dict[str, float]]
  error: str = ''                   # The compiler's out-of-memory message when it does not fit.


def _memory(stats: Any) -> dict[str, float]:
  """Per-chip bytes; `total` counts donated (aliased) outputs once, as the allocator does."""
  m = dict(arguments=float(stats.argument_size_in_bytes),
           outputs=float(stats.output_size_in_bytes),
           aliased=float(stats.alias_size_in_bytes),
           temporaries=float(stats.temp_size_in_bytes),
           code=float(stats.generated_code_size_in_bytes))
  m['total'] = m['arguments'] + m['outputs'] - m['aliased'] + m['temporaries'] + m['code']
  return m


def _cost(analysis: Any) -> dict[str, float]:
  if isinstance(analysis, (list, tuple)):   # Older jax: one dict per program.
    analysis = analysis[0] if analysis else {}
  analysis = analysis or {}
  return dict(flops=float(analysis.get('flops', 0.0)),
              bytes_accessed=float(analysis.get('bytes accessed', 0.0)),
              optimal_seconds=float(analysis.get('optimal_seconds', 0.0)))


def _is_oom(error: Exception) -> bool:
  text = str(error)
  return 'RESOURCE_EXHAUSTED' in text or 'Ran out of memory' in text


def compile_program(jitted: Any, *args: Any, hbm_bytes: float) -> Compiled:
  """Lowers and compiles `jitted(*args)` (ShapeDtypeStructs carrying shardings); reads it out.

  A program the compiler cannot fit in HBM comes back with `fits=False` and its message.
  """
  start = time.perf_counter()
  try:
    compiled = jitted.lower(*args).compile()
  except Exception as e:  # pylint: disable=broad-except  (XlaRuntimeError; its type moves)
    if not _is_oom(e):
      raise
    return Compiled(False, time.perf_counter() - start, {}, {}, {},
                    error=' '.join(str(e).split())[:600])
  seconds = time.perf_counter() - start
  memory = _memory(compiled.memory_analysis())
  return Compiled(memory['total'] <= hbm_bytes, seconds, memory, _cost(compiled.cost_analysis()),
                  collectives(compiled.as_text()))


def extrapolate_depth(at_1: Compiled, at_2: Compiled, depth: int) -> tuple[dict, dict]:
  """(cost, collectives) at `depth` blocks, linear in the depth from depth-1 and -2 compiles."""
  lin = lambda a, b: a + (depth - 1) * (b - a)
  cost = {k: lin(at_1.cost[k], at_2.cost[k]) for k in at_1.cost}
  coll = {k: {f: lin(at_1.collectives[k][f], at_2.collectives[k][f]) for f in ('count', 'bytes')}
          for k in at_1.collectives}
  return cost, coll


def estimate(cost: dict[str, float], *, model_flops: float, batch_size: int, tpu_slice: Slice
             ) -> dict[str, float]:
  """The compiler's step-time estimate as img/s per chip and MFU (model FLOPs over the slice's
  bf16 peak for that time): derived from an estimate, so themselves estimates."""
  seconds = cost.get('optimal_seconds', 0.0)
  if seconds <= 0:
    return dict(step_seconds=0.0, images_per_second_per_chip=0.0, mfu=0.0)
  peak = tpu_slice.chip.peak_tflops * 1e12 * tpu_slice.num_chips
  return dict(step_seconds=seconds,
              images_per_second_per_chip=batch_size / seconds / tpu_slice.num_chips,
              mfu=model_flops / (seconds * peak))
