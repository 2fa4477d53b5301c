"""Ahead-of-time compilation for a TPU slice on this CPU host (`cjepa-compile`, `aot.py`).

The compiles need libtpu (`pip install -e '.[tpu]'`); without it those tests skip with the
reason, and the message a user gets is tested instead.
"""

import importlib.util
import json
import os
import pathlib
import subprocess
import sys

import jax
import pytest

from cjepa_jax import aot
from cjepa_jax import compile as compile_lib
from cjepa_jax import config as config_lib

ROOT = pathlib.Path(__file__).resolve().parents[1]
HAVE_LIBTPU = importlib.util.find_spec('libtpu') is not None
needs_libtpu = pytest.mark.skipif(not HAVE_LIBTPU, reason="libtpu not installed (pip install -e "
                                  "'.[tpu]'): no TPU compiler to compile with")


def tiny_config(batch_size=8, fsdp=1):
  """A one-block ViT-Ti/4 at 32 px, 2 images a chip of a v5e:2x2: compiles for a TPU in ~8 s.

  (The TPU compile's time grows with the batch: 15 CPU-s at 32 images, 44 at 128.)
  """
  c = config_lib.default_config()
  c.batch_size = batch_size
  c.total_steps = 10
  c.data.dataset = 'synthetic'
  c.data.image_size = 32
  c.model.variant = 'Ti/4'
  c.model.depth = 1
  c.model.pred_depth = 1
  c.model.pred_width = 48
  c.mask.min_keep = 4
  c.optim.warmup_steps = 2
  c.mesh.data, c.mesh.fsdp = -1, fsdp
  return c


def _env():
  # Fully optimised, as a user's compile (conftest lowers LLVM's optimisation for the CPU tests).
  return dict(os.environ, JAX_PLATFORMS='cpu', PYTHONPATH=str(ROOT),
              JAX_DISABLE_MOST_OPTIMIZATIONS='0')


@pytest.fixture(autouse=True, scope='module')
def _fully_optimised():
  """The TPU compiles report what a user's compile gives: not conftest's lowered optimisation."""
  before = jax.config.values['jax_disable_most_optimizations']
  jax.config.update('jax_disable_most_optimizations', False)
  yield
  jax.config.update('jax_disable_most_optimizations', before)


def test_parse_slice_names_users_type():
  s = aot.parse_slice('v5p-32')
  assert (s.chip.name, s.shape, s.num_chips, s.topology_name) == ('v5p', (2, 2, 4), 16,
                                                                  'v5p:2x2x4')
  assert s.cloud_name == 'v5p-32'
  assert aot.parse_slice('v5e-16').shape == (4, 4)            # v5e counts chips.
  assert aot.parse_slice('v5litepod-16').chip.name == 'v5e'
  assert aot.parse_slice('v4-8').num_chips == 4               # v4 counts TensorCores.
  assert aot.parse_slice('v6e-64').shape == (8, 8)
  t = aot.parse_slice('v5p:4x4x4', num_slices=2)
  assert (t.num_chips, t.cloud_name) == (128, '2x v5p-128')
  for bad, match in (('v5p-6', 'no v5p slice of 3 chips'), ('v5p-3', 'multiple of 2'),
                     ('v9-8', 'unknown TPU generation'), ('a100', 'not a TPU slice'),
                     ('v5e:2x2x2', 'has 2 dimensions')):
    with pytest.raises(ValueError, match=match):
      aot.parse_slice(bad)


def test_collectives_are_counted_with_their_output_bytes():
  hlo = '\n'.join([
      '  %all-gather-start.1 = (bf16[8,64]{1,0}, bf16[32,64]{1,0}) all-gather-start(%p), dims={0}',
      '  %all-gather-done.1 = bf16[32,64]{1,0} all-gather-done(%all-gather-start.1)',
      '  %reduce-scatter.2 = f32[16,128]{1,0:T(8,128)} reduce-scatter(%g), dimensions={0}',
      '  %all-reduce.3 = (f32[]{:T(128)}, f32[192]{0}) all-reduce(%a, %b), to_apply=%add',
      '  ROOT %all-reduce.4 = s32[2]{0} all-reduce(%c), to_apply=%add',
      '  %fusion.1 = f32[4]{0} fusion(%all-reduce.3), kind=kLoop',      # A use, not a collective.
      '  %collective-permute-done = f32[10]{0} collective-permute-done(%cp-start)',
  ])
  c = aot.collectives(hlo)
  assert c['all-gather'] == {'count': 1, 'bytes': 32 * 64 * 2}
  assert c['reduce-scatter'] == {'count': 1, 'bytes': 16 * 128 * 4}
  assert c['all-reduce'] == {'count': 2, 'bytes': 4 + 192 * 4 + 2 * 4}
  assert c['collective-permute'] == {'count': 1, 'bytes': 40}
  assert c['all-to-all'] == {'count': 0, 'bytes': 0.0}


def test_estimate_derives_throughput_and_mfu():
  s = aot.parse_slice('v5p-8')   # 4 chips of 459 TFLOP/s.
  e = aot.estimate({'optimal_seconds': 0.5}, model_flops=459e12, batch_size=1024, tpu_slice=s)
  assert e['images_per_second_per_chip'] == pytest.approx(1024 / 0.5 / 4)
  assert e['mfu'] == pytest.approx(459e12 / (0.5 * 4 * 459e12))


def test_task_follows_the_config():
  assert compile_lib.task_of(config_flags_load('configs/in1k_vith14_ep300.py')) == 'train'
  assert compile_lib.task_of(config_flags_load('configs/finetune_in1k.py', 'L/16')) == 'finetune'
  assert compile_lib.task_of(config_flags_load('configs/probe_linear.py')) == 'features'


def config_flags_load(path, arg=None):
  spec = importlib.util.spec_from_file_location('recipe', ROOT / path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config() if arg is None else module.get_config(arg)


def test_missing_libtpu_is_one_line_naming_the_extra():
  code = ("import sys; sys.modules['libtpu'] = None\n"
          "from cjepa_jax import compile as c\n"
          "sys.argv = ['cjepa-compile', '--config', 'configs/cifar10_vit_tiny.py', "
          "'--topology', 'v5e-4']\n"
          "c.run()\n")
  r = subprocess.run([sys.executable, '-c', code], cwd=ROOT, env=_env(), capture_output=True,
                     text=True, timeout=300)
  assert r.returncode == 1
  lines = [l for l in r.stderr.splitlines() if 'cjepa-compile' in l]
  assert lines == ["cjepa-compile: error: compiling for a TPU slice needs libtpu, the TPU "
                   "compiler: pip install -e '.[tpu]' (it installs the libtpu that matches the "
                   "installed jax)."], r.stderr[-2000:]


@pytest.mark.slow   # A whole CLI compile for a TPU in a subprocess: ~20 CPU-s.
@needs_libtpu
def test_cli_json_reports_memory_flops_and_estimate():
  # TensorFlow made unimportable (a finder that refuses it: `sys.modules['tensorflow'] = None`
  # would trip einops' backend probe): nothing on the compile path may need it.
  code = ("import importlib.abc, runpy, sys\n"
          "class NoTF(importlib.abc.MetaPathFinder):\n"
          "  def find_spec(self, name, path, target=None):\n"
          "    if name.split('.')[0] == 'tensorflow':\n"
          "      raise ImportError('tensorflow is blocked in this test')\n"
          "sys.meta_path.insert(0, NoTF())\n"
          "sys.argv = ['cjepa-compile', '--config', 'configs/cifar10_vit_tiny.py', '--topology', "
          "'v5e:2x2', '--config.model.depth=1', '--config.model.pred_depth=1', "
          "'--config.batch_size=8', '--json']\n"
          "runpy.run_module('cjepa_jax.compile', run_name='__main__')\n")
  r = subprocess.run([sys.executable, '-c', code], cwd=ROOT, env=_env(), capture_output=True,
                     text=True, timeout=600)
  assert r.returncode == 0, r.stderr[-3000:]
  report = json.loads(r.stdout.strip().splitlines()[-1])
  assert report['task'] == 'train' and report['chips'] == 4 and report['fits']
  assert report['mesh'] == {'data': 4, 'fsdp': 1} and report['batch_per_chip'] == 2
  m = report['memory_gib']
  assert m['arguments'] > 0 and m['temporaries'] > 0
  assert m['total'] == pytest.approx(m['arguments'] + m['outputs'] - m['aliased'] +
                                     m['temporaries'] + m['code'])
  assert 0 < report['headroom'] < 1
  assert report['cost']['flops'] > 0 and report['estimate']['step_seconds'] > 0
  # The compiler's per-chip FLOPs against the analytic count of the step (matmuls only).
  ratio = report['cost']['flops'] * 4 / report['model_flops_per_step']
  assert 0.8 < ratio < 2.0, ratio
  assert report['collectives']['all-reduce']['count'] > 0   # Data parallel: gradient all-reduce.
  assert report['config'] == 'configs/cifar10_vit_tiny.py'


@pytest.mark.slow   # TPU compiles (~8 CPU-s each).
@needs_libtpu
def test_fsdp_turns_gradient_all_reduce_into_gathers_and_reduce_scatters():
  devices = aot.slice_devices(aot.parse_slice('v5e:2x2'))
  dp = compile_lib.compile_for_slice(tiny_config(fsdp=1), aot.parse_slice('v5e:2x2'),
                                     devices=devices)
  fsdp = compile_lib.compile_for_slice(tiny_config(fsdp=4), aot.parse_slice('v5e:2x2'),
                                       devices=devices)
  assert dp['mesh'] == {'data': 4, 'fsdp': 1} and fsdp['mesh'] == {'data': 1, 'fsdp': 4}
  dpc, fc = dp['collectives'], fsdp['collectives']
  # Data parallel all-reduces the whole gradient; FSDP gathers the weights and reduce-scatters
  # the gradients instead, and keeps a quarter of the parameters and optimizer state per chip.
  assert dpc['all-gather']['bytes'] < fc['all-gather']['bytes']
  assert fc['all-gather']['count'] > 0
  assert fc['reduce-scatter']['count'] + fc['all-to-all']['count'] > 0 or (
      fc['all-reduce']['bytes'] < dpc['all-reduce']['bytes'])
  assert fsdp['memory_gib']['arguments'] < 0.5 * dp['memory_gib']['arguments']


@pytest.mark.slow   # TPU compiles (~8 CPU-s each).
@needs_libtpu
def test_impossible_configuration_does_not_fit_and_exits_1():
  r = subprocess.run(
      [sys.executable, '-m', 'cjepa_jax.compile', '--config', 'configs/cifar10_vit_tiny.py',
       '--topology', 'v5e-4', '--config.model.depth=1', '--config.model.pred_depth=1',
       '--config.model.variant=S/8', '--config.data.image_size=512', '--config.batch_size=4096',
       '--config.mask.min_keep=10'],
      cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=600)
  assert r.returncode == 1, (r.stdout[-2000:], r.stderr[-2000:])
  errors = [l for l in r.stderr.splitlines() if l.startswith('cjepa-compile: error:')]
  assert len(errors) == 1, r.stderr[-3000:]
  assert 'does not fit on v5e-4' in errors[0] and '16 GiB' in errors[0]
  assert 'remat_policy' in errors[0] and 'accum_steps' in errors[0]
  assert 'DOES NOT FIT' in r.stdout


@pytest.mark.slow   # TPU compiles (~8 CPU-s each).
@needs_libtpu
def test_cjepa_step_gets_an_estimate():
  # VICReg's covariance once took the diagonal with `jnp.diagonal`, whose gradient made the cost
  # model return a negative time for the whole step: C-JEPA programs had no estimate. (The
  # 'blocks' reading can still get none: the compiler's own prefetch of the projector's weights
  # is an operation its cost model counts as -1 s.)
  config = tiny_config()
  config.vicreg.weight = 0.001
  s = aot.parse_slice('v5e:2x2')
  report = compile_lib.compile_for_slice(config, s, devices=aot.slice_devices(s))
  assert report['cost']['optimal_seconds'] > 0
  assert report['estimate']['step_seconds'] > 0 and 0 < report['estimate']['mfu'] < 1


@pytest.mark.slow
@needs_libtpu
def test_scanned_cost_is_extrapolated_to_the_unrolled_programs():
  s = aot.parse_slice('v5e:2x2')
  devices = aot.slice_devices(s)
  config = tiny_config()
  config.model.depth = 3
  unrolled = compile_lib.compile_for_slice(config, s, devices=devices)
  config.model.scan = True
  scanned = compile_lib.compile_for_slice(config, s, devices=devices)
  assert unrolled['cost_source'] == 'program'
  assert scanned['cost_source'].startswith('extrapolated')
  for key in ('flops', 'optimal_seconds'):
    assert scanned['cost'][key] == pytest.approx(unrolled['cost'][key], rel=0.05), key


@pytest.mark.slow
@needs_libtpu
@pytest.mark.parametrize('recipe', ['configs/finetune_cifar10.py', 'configs/probe_linear.py'])
def test_finetune_and_feature_extraction_compile(recipe):
  config = config_flags_load(recipe)
  with config.unlocked():
    config.model.depth = 1
    config.model.variant = 'Ti/4'
    config.data.image_size = 32
    config.batch_size = 8   # The TPU compile's time grows with the batch.
    if 'pretrained' in config:
      config.pretrained = 'random'
  report = compile_lib.compile_for_slice(config, aot.parse_slice('v5e:2x2'))
  assert report['task'] == compile_lib.task_of(config)
  assert report['fits'] and report['memory_gib']['total'] > 0 and report['cost']['flops'] > 0


@pytest.mark.slow
@needs_libtpu
def test_two_slices_put_the_data_axis_across_them():
  s = aot.parse_slice('v5e:2x2', num_slices=2)
  devices = aot.slice_devices(s)
  config = tiny_config(fsdp=2)
  report = compile_lib.compile_for_slice(config, s, devices=devices)
  assert report['chips'] == 8 and report['mesh'] == {'data': 4, 'fsdp': 2} and report['fits']
  mesh = compile_lib.sharding.make_mesh(compile_lib.sharding.MeshSpec.from_config(config), devices)
  # Every fsdp group lies within one slice; the data axis crosses them.
  slices = jax.numpy.array([[d.slice_index for d in row] for row in mesh.devices])
  assert all(len(set(row.tolist())) == 1 for row in slices)
  assert len(set(slices[:, 0].tolist())) == 2
  bad = tiny_config(fsdp=8)   # data = 1 cannot span 2 slices.
  with pytest.raises(ValueError, match='multiple of the 2 slices'):
    compile_lib.sharding.make_mesh(compile_lib.sharding.MeshSpec.from_config(bad), devices)


@pytest.mark.slow
@needs_libtpu
def test_accumulated_cost_counts_every_micro_batch():
  s = aot.parse_slice('v5e:2x2')
  devices = aot.slice_devices(s)
  full = compile_lib.compile_for_slice(tiny_config(batch_size=16), s, devices=devices)
  config = tiny_config(batch_size=16)
  config.accum_steps = 2
  acc = compile_lib.compile_for_slice(config, s, devices=devices)
  assert 'x 2 micro-batches' in acc['cost_source']
  # Two micro-batches of 8 cost what one batch of 16 does (plus a second optimizer count).
  assert acc['cost']['flops'] == pytest.approx(full['cost']['flops'], rel=0.1)
  # An upper bound: the optimizer and the EMA, once per step, are counted per micro-batch (for a
  # model this small they are a large part of the step).
  assert full['estimate']['step_seconds'] <= acc['estimate']['step_seconds']
  assert acc['estimate']['step_seconds'] <= 2 * full['estimate']['step_seconds']


def test_tpu_table_renders_a_report(tmp_path):
  report = dict(
      task='train', topology='v5p-16', chips=8, chip='v5p', hbm_gib=95.0,
      mesh={'data': 8, 'fsdp': 1}, batch_per_chip=256.0, accum_steps=1, remat_policy='none',
      scan=False, fits=True, headroom=0.19,
      memory_gib=dict(arguments=9.8, outputs=9.6, aliased=9.6, temporaries=66.6, code=0.6,
                      total=77.0),
      compile_seconds=717.4, cost_source='program', config='configs/in1k_vith14_ep300.py',
      estimate=dict(step_seconds=0.678, images_per_second_per_chip=377.5, mfu=0.543),
      collectives={'all-reduce': {'count': 14, 'bytes': 1.3 * 2**30}})
  (tmp_path / 'h14.json').write_text(json.dumps(report))
  (tmp_path / 'h14.cmd').write_text('python -m cjepa_jax.compile ...')
  r = subprocess.run([sys.executable, 'benchmarks/tpu_table.py', str(tmp_path)], cwd=ROOT,
                     capture_output=True, text=True, timeout=60)
  assert r.returncode == 0, r.stderr
  row = [l for l in r.stdout.splitlines() if l.startswith('| h14 ')][0]
  cells = [c.strip() for c in row.strip('|').split('|')]
  assert cells[2:] == ['v5p-16 (8)', '8 x 1', '256', '1', 'none', 'no', '9.8 + 66.6 = 77.0',
                       'yes (19%)', '717', '0.678', '378', '54%', '0.0 / 0.0 / 1.3']
  assert 'h14: python -m cjepa_jax.compile ...' in r.stdout
  missing = subprocess.run([sys.executable, 'benchmarks/tpu_table.py', str(tmp_path), '--rows',
                            'nope'], cwd=ROOT, capture_output=True, text=True, timeout=60)
  assert missing.returncode == 2 and 'nope.json does not exist' in missing.stderr
