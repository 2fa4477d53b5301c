r"""Compiles a recipe's step for a TPU slice on this host, without the slice: fit and estimate.

  python -m cjepa_jax.compile --config configs/in1k_vith14_ep300.py --topology v5p-32 \
      [--config.mesh.fsdp=4 --config.model.remat_policy=full --config.accum_steps=2 ...] [--json]

(also installed as `cjepa-compile`; needs `pip install -e '.[tpu]'`, which brings libtpu, the TPU
compiler: no TPU, no TensorFlow). It takes exactly the training command line, builds the same
mesh, shardings and jitted step that `cjepa-train` (or `cjepa-finetune`, or the probe's feature
extraction) builds on that slice, through the same `setup`, compiles it with nothing allocated,
and reports per chip:
  * memory: arguments, outputs, temporaries, code, and the total against the chip's HBM: fits or
    not, with the headroom; a program the compiler cannot fit fails as it would on the slice;
  * the compile time on this host;
  * the compiler's cost model: FLOPs, and its ESTIMATE of the step time, with the img/s per chip
    and the MFU derived from it (estimates, never measurements);
  * the collectives of the compiled program: count and bytes per chip and step.

`--topology` takes Cloud's accelerator types (`v4-32`, `v5e-16`, `v5p-128`, `v6e-64`; the
number counts TensorCores on v4 / v5p and chips on v5e / v6e) or the topology form
(`v5p:4x4x4`); `--num_slices` compiles for several such slices joined over the data-centre
network (the `data` mesh axis spans them). The task follows the config: a fine-tuning recipe
(`configs/finetune_*.py`) compiles the fine-tuning step, a probe config (`configs/probe_*.py`)
the probe's feature extraction, anything else the pretraining step.

The compiler's cost model counts the body of a loop once. With `model.scan=True` the FLOPs, the
estimate and the collectives are therefore taken from two extra unrolled compiles at depth 1 and
2, extrapolated linearly to the model's depth (`aot.extrapolate_depth`); with
`accum_steps` = A > 1 (a scan over micro-batches) from the step of one micro-batch (batch / A,
no accumulation) times A, an upper bound that counts the once-per-step optimizer, EMA and
gradient reduction A times. Memory and fit are always the real program's.

Exit status 0 when the program fits, 1 when it does not (one line naming the chip, what it
needed, what it has and the knobs that lower it), or on a bad flag.
"""

from __future__ import annotations

import copy
import json
import os
import sys
from typing import Any

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import ml_collections
from ml_collections import config_flags

from cjepa_jax import aot
from cjepa_jax import cli
from cjepa_jax import config as config_lib
from cjepa_jax import finetune_step
from cjepa_jax import flops as flops_lib
from cjepa_jax import sharding
from cjepa_jax import train_step
from cjepa_jax.evals import features as features_lib

_FLAGS: dict[str, Any] = {}  # Defined by `run()`, not at import.
TASKS = ('train', 'finetune', 'features')
_LOWER_IT = ('--config.model.remat_policy=full (or a jax.checkpoint_policies name), '
             '--config.mesh.fsdp=N, a smaller --config.batch_size or --config.accum_steps=N')


def task_of(config: ml_collections.ConfigDict) -> str:
  """'finetune' (a fine-tuning recipe), 'features' (a probe config) or 'train'."""
  if 'mix' in config:
    return 'finetune'
  if 'pretrained' in config and 'features' in config:
    return 'features'
  return 'train'


def _with(config: ml_collections.ConfigDict, **model: Any) -> ml_collections.ConfigDict:
  out = copy.deepcopy(config)
  with out.unlocked():
    for key, value in model.items():
      out.model[key] = value
  return out


def _pretrained_or_random(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """`config` with `pretrained='random'` when the recipe leaves it unset: a compile needs only
  the encoder's shapes, which the recipe's `model.*` gives."""
  c = copy.deepcopy(config)
  with c.unlocked():
    if not c.pretrained:
      c.pretrained = features_lib.RANDOM
  return c


def _random_encoder(config: ml_collections.ConfigDict) -> Any:
  """The encoder `config` names: a checkpoint's own (variant, depth, scan), or `model.*`."""
  return features_lib.resolve_encoder(
      features_lib.EncoderSource.from_config(_pretrained_or_random(config)))


def program(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh, task: str
            ) -> tuple[Any, tuple[Any, ...], float, dict[str, Any]]:
  """(jitted, abstract args, model FLOPs per step, facts) of `task` for `config` on `mesh`.

  The config is read here, into the specs the trainers make of it, and the jitted functions come
  from the same `setup` the trainers call: one code path.
  """
  if task == 'train':
    config_lib.validate(config)
    spec = train_step.StepSpec.from_config(config)
    run = train_step.setup(spec, mesh)
    state = sharding.with_shardings(run.abstract_state, run.state_shardings)
    model_flops = flops_lib.step_flops(run.models.step_shape()) * spec.batch_size
    enc = run.models.encoder
    batch = sharding.abstract_batch(spec.batch_size, spec.model.image_size, mesh)
    return (run.jitted_step, (state, batch), model_flops,
            dict(batch_size=spec.batch_size, depth=enc.num_layers, scan=enc.scan))
  if task == 'finetune':
    config = _pretrained_or_random(config)
    config_lib.validate_finetune(config)
    encoder, _ = features_lib.resolve_encoder(features_lib.EncoderSource.from_config(config))
    spec = finetune_step.StepSpec.from_config(config)
    run = finetune_step.setup(spec, mesh, encoder)
    state = sharding.with_shardings(run.abstract_state, run.state_shardings)
    enc = encoder.spec
    n = (spec.image_size // enc['patch']) ** 2
    model_flops = spec.batch_size * flops_lib.finetune_step_flops(
        enc['width'], enc['depth'], enc['mlp_dim'], n, enc['patch'], spec.num_classes)
    batch = sharding.abstract_batch(spec.batch_size, spec.image_size, mesh)
    return (run.jitted_step, (state, batch), model_flops,
            dict(batch_size=spec.batch_size, depth=encoder.num_layers, scan=encoder.scan))
  # The probe's feature extraction: the encoder forward on one sharded batch.
  encoder, info = _random_encoder(config)
  kinds = features_lib.feature_kinds(config.features)
  fn = features_lib.make_feature_fn(encoder, kinds)
  size = int(info['image_size'])
  params = jax.eval_shape(lambda: encoder.init(jax.random.key(0),
                                               jnp.zeros((1, size, size, 3)))['params'])
  params = sharding.with_shardings(params, jax.tree.map(lambda _: sharding.replicated(mesh),
                                                           params))
  s, b = sharding.batch_sharding(mesh), int(config.batch_size)
  sharding.check_batch_divisible(b, mesh, jax.process_count())
  batch = {'image': jax.ShapeDtypeStruct((b, size, size, 3), jnp.float32, sharding=s),
           'label': jax.ShapeDtypeStruct((b,), jnp.int32, sharding=s),
           'valid': jax.ShapeDtypeStruct((b,), jnp.bool_, sharding=s),
           'pos': jax.ShapeDtypeStruct((b,), jnp.int32, sharding=s)}
  spec = encoder.spec
  n = (size // spec['patch']) ** 2
  model_flops = b * sum(flops_lib.vit_forward_flops(spec['width'], spec['depth'], spec['mlp_dim'],
                                                     n, spec['patch']))
  return fn, (params, batch), model_flops, dict(batch_size=b, depth=encoder.num_layers,
                                                scan=encoder.scan)


def compile_for_slice(config: ml_collections.ConfigDict, tpu_slice: aot.Slice,
                      task: str | None = None, devices: list[Any] | None = None,
                      estimate: bool = True) -> dict[str, Any]:
  """Compiles `task` of `config` for `tpu_slice`; the report as a JSON-able dict.

  `estimate=False` skips the extra compiles that a scanned model or accumulation needs for the
  cost model (memory and fit only: faster).
  """
  task = task or task_of(config)
  devices = devices if devices is not None else aot.slice_devices(tpu_slice)
  mesh = sharding.make_mesh(sharding.MeshSpec.from_config(config), devices)
  jitted, args, model_flops, facts = program(config, mesh, task)
  hbm = tpu_slice.chip.hbm_gib * aot.GIB
  result = aot.compile_program(jitted, *args, hbm_bytes=hbm)
  cost, coll, source = result.cost, result.collectives, 'program'
  accum = int(config.get('accum_steps', 1)) if task == 'train' else 1
  if result.memory and (facts['scan'] or accum > 1) and not estimate:
    cost, coll = {}, {}
    source = 'not computed (--noestimate: a loop body is counted once, see --help)'
  elif result.memory and (facts['scan'] or accum > 1):
    # The cost model counts a loop body once: a scanned block, or the scan over micro-batches.
    # Cost one micro-batch's step without either, then scale (see the module docstring).
    micro = copy.deepcopy(config)
    with micro.unlocked():
      micro.batch_size = config.batch_size // accum
      if accum > 1:
        micro.accum_steps = 1
    if facts['scan']:
      small = [aot.compile_program(*_program_args(_with(micro, scan=False, depth=d), mesh, task),
                                   hbm_bytes=float('inf')) for d in (1, 2)]
      cost, coll = aot.extrapolate_depth(small[0], small[1], facts['depth'])
      source = f'extrapolated from unrolled depth-1 and depth-2 compiles to depth {facts["depth"]}'
    else:
      unrolled = aot.compile_program(*_program_args(micro, mesh, task), hbm_bytes=float('inf'))
      cost, coll, source = unrolled.cost, unrolled.collectives, 'the micro-batch program'
    if accum > 1:
      cost = {k: v * accum for k, v in cost.items()}
      coll = {k: {f: x * accum for f, x in v.items()} for k, v in coll.items()}
      source += (f' x {accum} micro-batches (an upper bound: the optimizer, EMA and gradient '
                 'reduction, once per step, are counted per micro-batch)')
  est = aot.estimate(cost, model_flops=model_flops, batch_size=facts['batch_size'],
                     tpu_slice=tpu_slice) if result.memory and cost else {}
  m = config.model
  return dict(
      task=task, topology=tpu_slice.cloud_name, topology_name=tpu_slice.topology_name,
      num_slices=tpu_slice.num_slices, chips=tpu_slice.num_chips, chip=tpu_slice.chip.name,
      hbm_gib=tpu_slice.chip.hbm_gib, mesh=dict(mesh.shape), batch_size=facts['batch_size'],
      batch_per_chip=facts['batch_size'] / tpu_slice.num_chips,
      accum_steps=int(config.get('accum_steps', 1)), dtype=m.dtype, remat_policy=m.remat_policy,
      scan=bool(facts['scan']), depth=facts['depth'], fits=result.fits,
      headroom=(1 - result.memory['total'] / hbm) if result.memory else None,
      memory_gib={k: v / aot.GIB for k, v in result.memory.items()},
      compile_seconds=result.compile_seconds, model_flops_per_step=model_flops,
      cost=cost, cost_source=source, estimate=est, collectives=coll, error=result.error)


def _program_args(config, mesh, task):
  jitted, args, _, _ = program(config, mesh, task)
  return (jitted,) + tuple(args)


def _gib(x: float) -> str:
  """GiB with one decimal; MiB below 1 GiB (small models)."""
  return f'{x:.1f} GiB' if abs(x) >= 1 else f'{x * 1024:.1f} MiB'


def format_report(r: dict[str, Any], config_name: str) -> str:
  """The human-readable block."""
  what = {'train': 'pretraining step', 'finetune': 'fine-tuning step',
          'features': "probe's feature extraction"}[r['task']]
  lines = [f"{what} of {config_name} on {r['topology']} ({r['chips']} chips of TPU {r['chip']}, "
           f"{r['hbm_gib']:g} GiB HBM each; {r['topology_name']})",
           f"  mesh data {r['mesh']['data']} x fsdp {r['mesh']['fsdp']}, global batch "
           f"{r['batch_size']} ({r['batch_per_chip']:g} per chip), {r['dtype']}, remat "
           f"{r['remat_policy']}, scan {r['scan']}, accum_steps {r['accum_steps']}",
           f"  compile: {r['compile_seconds']:.0f} s on this host"]
  if not r['memory_gib']:
    lines.append(f"  memory per chip: DOES NOT FIT (the compiler ran out of HBM): {r['error']}")
    return '\n'.join(lines)
  m = r['memory_gib']
  verdict = (f"fits, {100 * r['headroom']:.0f}% headroom" if r['fits'] else
             f"DOES NOT FIT ({_gib(m['total'] - r['hbm_gib'])} over)")
  lines.append(f"  memory per chip: arguments {_gib(m['arguments'])}, outputs "
               f"{_gib(m['outputs'])} ({_gib(m['aliased'])} of them donated), temporaries "
               f"{_gib(m['temporaries'])}, code {_gib(m['code'])}; total {_gib(m['total'])} of "
               f"{r['hbm_gib']:g} GiB: {verdict}")
  e, c = r['estimate'], r['cost']
  if not c:
    lines.append(f"  compiler's estimate: {r['cost_source']}")
  elif e.get('step_seconds'):
    lines.append(f"  compiler's estimate (not measured): {e['step_seconds']:.3f} s a step, "
                 f"{e['images_per_second_per_chip']:.0f} img/s per chip, MFU "
                 f"{100 * e['mfu']:.0f}% ({r['model_flops_per_step'] / 1e12:.3g} model TFLOP a "
                 f"step; the compiler counts {c['flops'] / 1e12:.3g} TFLOP per chip)")
  elif c.get('optimal_seconds', 0) < 0:
    lines.append(f"  compiler's estimate: none (its cost model returned a negative step time, "
                 f"{c['optimal_seconds']:.2f} s, for this program)")
  else:
    lines.append("  compiler's estimate: none (the cost model gave no step time)")
  if c and r['cost_source'] != 'program':
    lines.append(f"  (cost and collectives {r['cost_source']})")
  coll = ', '.join(f"{k} {v['count']:.0f} x = {_gib(v['bytes'] / aot.GIB)}"
                   for k, v in r['collectives'].items() if v['count'])
  if r['collectives']:
    lines.append(f"  collectives per chip and step: {coll or 'none'}")
  return '\n'.join(lines)


def not_fitting_line(r: dict[str, Any]) -> str:
  """The one line for a program that does not fit: chip, need, capacity, knobs."""
  need = (f"needs {_gib(r['memory_gib']['total'])} per chip" if r['memory_gib'] else
          f"ran out of HBM while compiling ({r['error'][:240]})")
  return (f"the {r['task']} step does not fit on {r['topology']}: it {need}, and a TPU "
          f"{r['chip']} chip has {r['hbm_gib']:g} GiB; lower it with {_LOWER_IT}.")


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  config, topology = _FLAGS['config'].value, _FLAGS['topology'].value
  if config is None or not topology:
    raise app.UsageError('--config and --topology are required, e.g. --config '
                             'configs/in1k_vith14_ep300.py --topology v5p-32')
  tpu_slice = aot.parse_slice(topology, _FLAGS['num_slices'].value)
  task = _FLAGS['task'].value
  report = compile_for_slice(config, tpu_slice, None if task == 'auto' else task,
                             estimate=_FLAGS['estimate'].value)
  report['config'] = config_flags.get_config_filename(flags.FLAGS['config'])
  if _FLAGS['json'].value:
    print(json.dumps(report))
  else:
    print(format_report(report, report['config']))
  if not report['fits']:
    cli.fail('cjepa-compile', not_fitting_line(report))


def run() -> None:
  """Console-script entry point (`cjepa-compile`)."""
  # The host's own backend stays the CPU: the slice's devices are compile-only, and a machine
  # with libtpu but no TPU would otherwise try (and fail, loudly) to open one.
  if not os.environ.get('JAX_PLATFORMS'):
    jax.config.update('jax_platforms', 'cpu')
  # libtpu looks for a TPU VM's metadata when it loads: say there is no pod to find, or it
  # prints a multi-line error on every start.
  os.environ.setdefault('TPU_WORKER_HOSTNAMES', 'localhost')
  _FLAGS['config'] = config_flags.DEFINE_config_file(
      'config', None, 'Recipe file (configs/*.py[:arg]), as for cjepa-train / cjepa-finetune.',
      lock_config=True)
  _FLAGS['topology'] = flags.DEFINE_string(
      'topology', None, 'TPU slice: v4-32, v5e-16, v5p-128, v6e-64 or v5p:4x4x4.')
  _FLAGS['num_slices'] = flags.DEFINE_integer('num_slices', 1, 'Slices joined over the network.')
  _FLAGS['task'] = flags.DEFINE_enum('task', 'auto', ('auto',) + TASKS,
                                     'What to compile; auto follows the config.')
  _FLAGS['json'] = flags.DEFINE_bool('json', False, 'Print the report as one JSON line.')
  _FLAGS['estimate'] = flags.DEFINE_bool(
      'estimate', True, 'Cost a scanned model or accumulation with extra compiles; '
      '--noestimate reports memory and fit only.')
  cli.run('cjepa-compile', main, doc=__doc__, module=sys.argv[0] if __name__ == '__main__'
          else __name__, extra_help=config_lib.help_text)


if __name__ == '__main__':
  run()
