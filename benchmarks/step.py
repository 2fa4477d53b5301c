r"""Times the real jitted I-JEPA / C-JEPA train step on synthetic images: compile, img/s, MFU.

  python benchmarks/step.py --variant H/14 --image_size 224 --batch_size 128 --steps 20 \
      [--warmup 2 --dtype bfloat16 --remat none|full|<jax.checkpoint_policies name> --scan \
       --attention xla|cudnn \
       --pred_depth 12 --pred_width 384 --vicreg_weight 0 --vicreg_mode context \
       --mesh.data -1 --mesh.fsdp 1 --peak_tflops X --depth N --min_keep K --context_tokens KC \
       --profile_dir DIR --profile_steps 2 --compile_only --json]

The step is the one training runs: the config is `cjepa_jax.config.default_config()` with the
flags' overrides, read as the trainer reads it (`MeshSpec` / `StepSpec.from_config`): the mesh is
`sharding.make_mesh(mesh_spec)` and the jitted step, its shardings and the state initialiser come
from `train_step.setup(step_spec, mesh)`. Nothing here imports TensorFlow or the
input pipeline: batches are random-normal images made on the devices with the batch sharding (a few
distinct ones, cycled), so the numbers are the step alone, with no input cost.

Measured, in this order:
  compile_s   `jitted.lower(abstract state, abstract batch)` plus `.compile()` (ahead of time, on
              ShapeDtypeStructs: `--compile_only` needs no memory for the state);
  warm-up     `--warmup` calls of the compiled executable, not timed;
  step_time_s the MEDIAN of `--steps` calls, each timed to `jax.block_until_ready` of its outputs.
Derived: images_per_s = batch / step_time; tflops = the analytic matmul FLOPs of one step
(`flops.step_flops(models.step_shape()) * batch`, which leaves remat's recomputation out, as MFU
does) over step_time; mfu = tflops / (per-device peak x devices), null when the device's peak is
unknown (CPU) and no `--peak_tflops` is given; peak_memory_bytes = the largest
`memory_stats()['peak_bytes_in_use']` over the local devices, null where the backend reports none
(CPU). Also reported: XLA's own FLOP count and memory estimate of the compiled step (per device
program; XLA counts the body of a scanned loop once, so with `--scan` its FLOPs are ~1/depth).

`--profile_dir DIR` runs `--profile_steps` more steps after the timed ones (so the timing is not
the profiler's) inside `jax.profiler.trace(DIR, create_perfetto_trace=True)`: an XPlane for
TensorBoard / XProf and a Perfetto JSON trace that `benchmarks/suite_report.py` reads.
`tensorflow_imported` in the JSON line says whether anything imported TensorFlow (it must not:
the accelerator machines have none); `xla_flags` is the XLA_FLAGS the process ran with.

The command line runs with the XLA:CPU options training runs with (`cjepa_jax.cpu_flags.apply()`,
before the backend starts; `CJEPA_XLA_CPU_FLAGS=0` leaves XLA_FLAGS as it is).

With `--json` the last line of stdout is one JSON object with all of it and the settings.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
import time
from typing import Any, Callable, Sequence

# `python benchmarks/step.py` puts benchmarks/ first on sys.path; the package is one level up.
_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _REPO not in sys.path:
  sys.path.insert(0, _REPO)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import ml_collections  # noqa: E402

from cjepa_jax import config as config_lib  # noqa: E402
from cjepa_jax import cpu_flags  # noqa: E402
from cjepa_jax import flops as flops_lib  # noqa: E402
from cjepa_jax import sharding  # noqa: E402
from cjepa_jax import train_step as step_lib  # noqa: E402  (no TensorFlow, no absl flags)

# The run length the schedules are laid over; any value past the timed steps will do.
_TOTAL_STEPS = 1_000_000
# Distinct synthetic batches, cycled, so that no two consecutive steps see the same input.
_NUM_BATCHES = 3
# Below this many patches (e.g. 8x8 at 32/4) the default min_keep of 10 admits no target block;
# use the CIFAR-10 recipe's value there (configs/cifar10_vit_tiny.py).
_SMALL_GRID_PATCHES = 100
_SMALL_GRID_MIN_KEEP = 4


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
  """The command line (see the module docstring); `argv` None reads sys.argv."""
  p = argparse.ArgumentParser(
      prog='benchmarks/step.py',
      description='Compile time, img/s, TFLOP/s and MFU of the real jitted train step on '
                  'synthetic images.')
  p.add_argument('--variant', default='H/14', help="ViT '<Ti|S|B|L|H|g>/<patch>'.")
  p.add_argument('--depth', type=int, default=0, help='> 0 overrides the variant depth.')
  p.add_argument('--image_size', type=int, default=224)
  p.add_argument('--batch_size', type=int, default=128, help='Global batch, over all devices.')
  p.add_argument('--steps', type=int, default=20, help='Timed steps (the median is reported).')
  p.add_argument('--warmup', type=int, default=2, help='Untimed steps after the compile.')
  p.add_argument('--dtype', default='bfloat16', help='float32, bfloat16 or float16.')
  p.add_argument('--remat', default='none',
                 help="'none', 'full' or a jax.checkpoint_policies name.")
  p.add_argument('--scan', action='store_true', help='nn.scan over the blocks.')
  p.add_argument('--attention', default='xla',
                 help="Attention kernel: 'xla' or 'cudnn' (cuDNN flash attention, NVIDIA GPUs).")
  p.add_argument('--pred_depth', type=int, default=12)
  p.add_argument('--pred_width', type=int, default=384)
  p.add_argument('--vicreg_weight', type=float, default=0.0, help='> 0: C-JEPA.')
  p.add_argument('--vicreg_mode', default='context', help="'context' or 'blocks'.")
  p.add_argument('--min_keep', type=int, default=0,
                 help=f'Mask min_keep; 0: the config default, or {_SMALL_GRID_MIN_KEEP} on grids '
                      f'of fewer than {_SMALL_GRID_PATCHES} patches (as the CIFAR-10 recipe).')
  p.add_argument('--context_tokens', type=int, default=0,
                 help='Context budget Kc (config.mask.context_tokens); 0: the reference-matching '
                      'default (e.g. 68 at 224/14, 11 at 32/4).')
  p.add_argument('--mesh.data', dest='mesh_data', type=int, default=-1)
  p.add_argument('--mesh.fsdp', dest='mesh_fsdp', type=int, default=1)
  p.add_argument('--peak_tflops', type=float, default=0.0,
                 help='Per-device peak TFLOP/s for MFU; 0 looks the device kind up.')
  p.add_argument('--seed', type=int, default=0)
  p.add_argument('--profile_dir', default='',
                 help='Trace --profile_steps extra steps, after the timed ones, into this folder.')
  p.add_argument('--profile_steps', type=int, default=2, help='Steps traced with --profile_dir.')
  p.add_argument('--compile_only', action='store_true',
                 help='Lower and compile only: no state is allocated and no step runs.')
  p.add_argument('--json', action='store_true', help='Print one JSON object as the last line.')
  return p.parse_args(argv)


def build_config(args: argparse.Namespace) -> ml_collections.ConfigDict:
  """default_config() with the flags' overrides; raises ValueError on bad sizes."""
  for name in ('batch_size', 'image_size', 'pred_depth', 'pred_width'):
    if getattr(args, name) < 1:
      raise ValueError(f'--{name}={getattr(args, name)} must be >= 1.')
  if args.depth < 0 or args.warmup < 0 or args.min_keep < 0 or args.context_tokens < 0:
    raise ValueError('--depth, --warmup, --min_keep and --context_tokens must be >= 0.')
  if args.profile_dir and (args.compile_only or args.profile_steps < 1):
    raise ValueError('--profile_dir needs steps to trace: --profile_steps >= 1 and no '
                     '--compile_only.')
  if args.steps < 1 and not args.compile_only:
    raise ValueError(f'--steps={args.steps}: time at least one step, or pass --compile_only.')
  c = config_lib.default_config()
  c.seed = args.seed
  c.batch_size = args.batch_size
  c.total_steps = max(_TOTAL_STEPS, args.warmup + args.steps + 1)
  # No timed step is a log step, so none pays the RankMe monitor's SVD (most training steps don't).
  c.log_every_steps = c.total_steps
  c.peak_tflops = args.peak_tflops
  c.data.dataset = 'synthetic'
  c.data.image_size = args.image_size
  c.model.variant = args.variant
  c.model.depth = args.depth
  c.model.dtype = args.dtype
  c.model.remat_policy = args.remat
  c.model.scan = bool(args.scan)
  c.model.attention = args.attention
  c.model.pred_depth = args.pred_depth
  c.model.pred_width = args.pred_width
  c.vicreg.weight = args.vicreg_weight
  c.vicreg.mode = args.vicreg_mode
  c.mesh.data = args.mesh_data
  c.mesh.fsdp = args.mesh_fsdp
  c.mask.context_tokens = args.context_tokens
  if args.min_keep:
    c.mask.min_keep = args.min_keep
  else:
    from cjepa_jax.models import vit  # pylint: disable=g-import-not-at-top
    _, patch = vit.parse_variant(args.variant)  # ValueError naming the valid variants.
    if (args.image_size // patch)**2 < _SMALL_GRID_PATCHES:
      c.mask.min_keep = _SMALL_GRID_MIN_KEEP
  return c


def synthetic_batches(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh,
                      num: int = _NUM_BATCHES) -> list[dict[str, jax.Array]]:
  """`num` batches {'image': [B, S, S, 3] float32 N(0, 1), 'label': [B] int32}, made sharded."""
  s = sharding.batch_sharding(mesh)
  size, b = config.data.image_size, config.batch_size

  def make(key):
    return {'image': jax.random.normal(key, (b, size, size, 3), jnp.float32),
            'label': jnp.zeros((b,), jnp.int32)}

  make = jax.jit(make, out_shardings={'image': s, 'label': s})
  keys = jax.random.split(jax.random.key(config.seed + 1), num)
  return [make(k) for k in keys]


def _abstract(tree: Any, shardings: Any) -> Any:
  return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                      tree, shardings)


def _peak_memory_bytes(devices: Sequence[jax.Device]) -> int | None:
  """The largest `peak_bytes_in_use` over this process's `devices`; None if none reports it."""
  peaks = []
  for d in devices:
    if d.process_index != jax.process_index():
      continue
    stats = d.memory_stats() if hasattr(d, 'memory_stats') else None
    if stats and 'peak_bytes_in_use' in stats:
      peaks.append(int(stats['peak_bytes_in_use']))
  return max(peaks) if peaks else None


def _xla_costs(compiled: Any) -> tuple[float | None, int | None]:
  """XLA's FLOPs and memory (arguments + outputs + temporaries - aliased) of the program."""
  flops = mem = None
  try:
    cost = compiled.cost_analysis()
    if isinstance(cost, (list, tuple)):  # Older jax: one dict per program.
      cost = cost[0] if cost else None
    if cost and 'flops' in cost:
      flops = float(cost['flops'])
  except Exception:  # pylint: disable=broad-except  (not every backend implements it)
    pass
  try:
    m = compiled.memory_analysis()
    if m is not None:
      mem = int(m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes
                - m.alias_size_in_bytes)
  except Exception:  # pylint: disable=broad-except
    pass
  return flops, mem


def run_benchmark(config: ml_collections.ConfigDict, *, steps: int = 20, warmup: int = 2,
                  compile_only: bool = False, devices: Sequence[jax.Device] | None = None,
                  log: Callable[[str], None] = print, profile_dir: str = '',
                  profile_steps: int = 2) -> dict[str, Any]:
  """Compiles and times the train step of `config` over `devices` (default: all).

  Returns the result dict: the keys of the `--json` line (see the module docstring); the timing
  keys are None with `compile_only`. With `profile_dir`, `profile_steps` more steps run after the
  timed ones under `jax.profiler.trace(profile_dir)`.
  """
  mesh = sharding.make_mesh(sharding.MeshSpec.from_config(config),
                            None if devices is None else list(devices))
  run = step_lib.setup(step_lib.StepSpec.from_config(config), mesh)
  models, state_shardings, abstract_state = run.models, run.state_shardings, run.abstract_state
  init_fn, jitted_step = run.init_fn, run.jitted_step
  shape = models.step_shape()
  b = config.batch_size
  flops_per_step = flops_lib.step_flops(shape) * b
  peak = flops_lib.peak_tflops(mesh.devices.flat[0], override=config.peak_tflops) * mesh.size
  devices = list(mesh.devices.flat)
  log(f'{config.model.variant} depth {shape.depth} at {config.data.image_size} px, batch {b}, '
      f'{config.model.dtype}, remat {config.model.remat_policy}, scan {config.model.scan}, '
      f'attention {config.model.attention}, '
      f'predictor {shape.pred_depth}x{shape.pred_width}; mesh {dict(mesh.shape)} over '
      f'{len(devices)} x {devices[0].device_kind}; context {shape.context_tokens} + '
      f'{shape.num_targets} x {shape.target_tokens} target tokens of {shape.num_patches}.')

  abstract_batch = sharding.abstract_batch(b, config.data.image_size, mesh)
  t0 = time.perf_counter()
  lowered = jitted_step.lower(_abstract(abstract_state, state_shardings), abstract_batch)
  t1 = time.perf_counter()
  compiled = lowered.compile()
  t2 = time.perf_counter()
  xla_flops, xla_memory = _xla_costs(compiled)
  log(f'compile: {t2 - t0:.1f} s (trace + lower {t1 - t0:.1f} s, XLA compile {t2 - t1:.1f} s); '
      f'analytic {flops_per_step / 1e12:.4g} TFLOP/step'
      + (f', XLA {xla_flops / 1e12:.4g} TFLOP/step per device' if xla_flops else '')
      + (f', XLA memory estimate {xla_memory / 2**30:.2f} GiB/device' if xla_memory else ''))

  result: dict[str, Any] = dict(
      images_per_s=None, step_time_s=None, tflops=None, mfu=None, profile_error=None,
      compile_s=t2 - t0, peak_memory_bytes=None,
      lower_s=t1 - t0, xla_compile_s=t2 - t1, step_time_mean_s=None, step_time_min_s=None,
      step_time_max_s=None, flops_per_step=flops_per_step, xla_flops_per_device=xla_flops,
      xla_memory_bytes=xla_memory, peak_tflops_total=peak or None, finite=None)
  if not compile_only:
    state = init_fn()
    batches = synthetic_batches(config, mesh)
    jax.block_until_ready((state, batches))
    metrics = None
    for i in range(warmup):
      state, metrics, _ = compiled(state, batches[i % len(batches)])
      jax.block_until_ready((state, metrics))
    times = []
    for i in range(steps):
      batch = batches[(warmup + i) % len(batches)]
      t = time.perf_counter()
      state, metrics, _ = compiled(state, batch)
      jax.block_until_ready((state, metrics))
      times.append(time.perf_counter() - t)
    step_time = statistics.median(times)
    tflops = flops_per_step / step_time / 1e12
    result.update(
        images_per_s=b / step_time, step_time_s=step_time, tflops=tflops,
        mfu=tflops / peak if peak else None, peak_memory_bytes=_peak_memory_bytes(devices),
        step_time_mean_s=statistics.fmean(times), step_time_min_s=min(times),
        step_time_max_s=max(times), finite=bool(jax.device_get(metrics['finite'])))
    mem = result['peak_memory_bytes']
    log(f'step: median {step_time * 1e3:.1f} ms over {steps} (min {min(times) * 1e3:.1f}, '
        f'max {max(times) * 1e3:.1f}); {b / step_time:.1f} img/s; {tflops:.3g} TFLOP/s; MFU '
        + (f'{result["mfu"]:.1%}' if peak else 'n/a (unknown peak: pass --peak_tflops)')
        + (f'; peak memory {mem / 2**30:.2f} GiB' if mem else '; peak memory n/a'))
    if not result['finite']:
      log('warning: the last step had a non-finite loss or gradient.')
    if profile_dir:
      # After the timed steps, so that the profiler's overhead is in none of them; a profiler
      # that fails (no CUPTI, say) costs the trace, not the numbers above.
      try:
        os.makedirs(profile_dir, exist_ok=True)
        with jax.profiler.trace(profile_dir, create_perfetto_trace=True):
          for i in range(profile_steps):
            with jax.profiler.StepTraceAnnotation('train_step', step_num=i):
              state, metrics, _ = compiled(state, batches[i % len(batches)])
            jax.block_until_ready((state, metrics))
        log(f'profile: {profile_steps} steps traced into {profile_dir}')
      except Exception as e:  # pylint: disable=broad-except
        result['profile_error'] = f'{type(e).__name__}: {e}'
        log(f'warning: the profile failed: {result["profile_error"]}')

  result.update(
      variant=config.model.variant, depth=shape.depth, image_size=config.data.image_size,
      batch_size=b, dtype=config.model.dtype, remat=config.model.remat_policy,
      scan=bool(config.model.scan), attention=config.model.attention,
      pred_depth=shape.pred_depth, pred_width=shape.pred_width,
      vicreg_weight=config.vicreg.weight, vicreg_mode=config.vicreg.mode,
      context_tokens=shape.context_tokens, target_tokens=shape.target_tokens,
      mesh={k: int(v) for k, v in mesh.shape.items()}, devices=len(devices),
      device_kind=devices[0].device_kind, platform=devices[0].platform,
      jax_version=jax.__version__, steps=0 if compile_only else steps,
      warmup=0 if compile_only else warmup, compile_only=bool(compile_only),
      profile_dir=profile_dir or None, profile_steps=profile_steps if profile_dir else 0,
      xla_flags=os.environ.get('XLA_FLAGS', ''),
      # The accelerator machines have no TensorFlow: nothing the step needs may import it.
      tensorflow_imported='tensorflow' in sys.modules,
      date=datetime.date.today().isoformat())
  return result


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
  """Parses the flags, runs the benchmark, prints the JSON line with `--json`; returns it."""
  args = parse_args(argv)
  cpu_flags.apply()  # The XLA:CPU options training runs with (before the backend starts).
  config = build_config(args)
  result = run_benchmark(config, steps=args.steps, warmup=args.warmup,
                         compile_only=args.compile_only, profile_dir=args.profile_dir,
                         profile_steps=args.profile_steps)
  if args.json:
    print(json.dumps(result, sort_keys=True), flush=True)
  return result


if __name__ == '__main__':
  try:
    main()
  except ValueError as e:
    print(f'benchmarks/step.py: error: {e}', file=sys.stderr)
    sys.exit(2)
