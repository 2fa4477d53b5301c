"""benchmarks/step.py: the JSON contract end to end, and the analytic FLOP count against XLA's.

XLA's own count (`compiled.cost_analysis()['flops']`, 2 FLOPs per multiply-add like ours) is the
independent reference for `cjepa_jax.flops`. It also counts what the analytic count leaves out
(LayerNorm, softmax, GELU, AdamW, the EMA, mask sampling) and does not count what the analytic
count overstates (see test_step_flops_match_xla), so the two agree to a few percent, not exactly.
"""

import importlib.util
import json
import math
import os
import pathlib
import shutil
import subprocess
import sys
import tarfile

import jax
import jax.numpy as jnp
import pytest

from cjepa_jax import flops as flops_lib
from cjepa_jax.models import jepa
from multiprocess_utils import TEST_XLA_CPU_FLAGS
from multiprocess_utils import xla_flags

REPO = pathlib.Path(__file__).resolve().parents[1]
SCRIPT = REPO / 'benchmarks' / 'step.py'
SUITE = REPO / 'benchmarks' / 'gpu_suite.sh'

# The brief's smoke command, plus a peak so that the MFU arithmetic is checked too.
CLI_ARGS = ['--variant', 'Ti/4', '--depth', '1', '--image_size', '32', '--batch_size', '8',
            '--steps', '2', '--warmup', '1', '--pred_depth', '1', '--pred_width', '48',
            '--peak_tflops', '0.5', '--json']
JSON_KEYS = ('images_per_s', 'step_time_s', 'tflops', 'mfu', 'compile_s', 'peak_memory_bytes',
             'variant', 'image_size', 'batch_size', 'dtype', 'remat', 'scan', 'devices',
             'device_kind', 'jax_version')


def _load_module(name, path):
  spec = importlib.util.spec_from_file_location(name, path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


bench = _load_module('benchmark_step', SCRIPT)
report = _load_module('benchmark_suite_report', REPO / 'benchmarks' / 'suite_report.py')


@pytest.mark.slow
def test_cli_json_line_on_eight_devices_without_tensorflow():
  # runpy in a fresh interpreter: after the whole run, TensorFlow must never have been imported.
  wrapper = ('import runpy, sys; sys.argv = [sys.argv[1]] + sys.argv[2:]; '
             "runpy.run_path(sys.argv[0], run_name='__main__'); "
             "assert 'tensorflow' not in sys.modules, 'the benchmark imported TensorFlow'; "
             "assert 'cjepa_jax.data.input_pipeline' not in sys.modules")
  # Backend optimisation level 0 makes XLA's CPU compile ~40% cheaper; this test checks the
  # JSON contract, not the speed.
  env = dict(os.environ, JAX_PLATFORMS='cpu',
             XLA_FLAGS=f'{xla_flags(8)} --xla_backend_optimization_level=0')
  proc = subprocess.run([sys.executable, '-c', wrapper, str(SCRIPT)] + CLI_ARGS, cwd=REPO,
                        env=env, capture_output=True, text=True, timeout=300, check=False)
  assert proc.returncode == 0, proc.stderr[-3000:]
  lines = proc.stdout.strip().splitlines()
  assert len(lines) >= 2, proc.stdout  # Human-readable lines, then the JSON object.
  r = json.loads(lines[-1])
  for key in JSON_KEYS:
    assert key in r, key
  assert (r['variant'], r['image_size'], r['batch_size'], r['depth']) == ('Ti/4', 32, 8, 1)
  assert (r['dtype'], r['remat'], r['scan']) == ('bfloat16', 'none', False)
  assert r['devices'] == 8 and r['mesh'] == {'data': 8, 'fsdp': 1}
  assert r['device_kind'] == 'cpu' and r['jax_version'] == jax.__version__
  assert r['peak_memory_bytes'] is None  # The CPU backend reports no memory stats.
  assert r['finite'] is True
  assert r['tensorflow_imported'] is False and r['profile_dir'] is None
  assert '--xla_force_host_platform_device_count=8' in r['xla_flags']
  for key in ('images_per_s', 'step_time_s', 'tflops', 'mfu', 'compile_s', 'flops_per_step'):
    assert r[key] > 0, key
  assert r['lower_s'] < r['compile_s']
  assert r['step_time_min_s'] <= r['step_time_s'] <= r['step_time_max_s']
  # Derived numbers follow from the measured median and the analytic count.
  assert r['images_per_s'] == pytest.approx(8 / r['step_time_s'], rel=1e-9)
  assert r['tflops'] == pytest.approx(r['flops_per_step'] / r['step_time_s'] / 1e12, rel=1e-9)
  assert r['mfu'] == pytest.approx(r['tflops'] / (0.5 * 8), rel=1e-9)
  # 8 x 8 grid with min_keep 4 (the CIFAR recipe's): the reference-matching budgets.
  assert (r['context_tokens'], r['target_tokens']) == (11, 12)
  shape = flops_lib.StepShape(width=192, depth=1, mlp_hidden=768, num_patches=64, patch_size=4,
                              context_tokens=11, target_tokens=12, num_targets=4, pred_width=48,
                              pred_depth=1)
  assert r['flops_per_step'] == pytest.approx(8 * flops_lib.step_flops(shape), rel=1e-12)


def _cfg(*argv):
  return bench.build_config(bench.parse_args(list(argv)))


def test_encoder_forward_flops_match_xla():
  """The per-block formula alone: a float32 encoder forward on all patches, matmuls dominate."""
  config = _cfg('--variant', 'S/8', '--depth', '2', '--image_size', '64', '--dtype', 'float32')
  models = jepa.build_models(jepa.ModelSpec.from_config(config))
  images = jax.ShapeDtypeStruct((4, 64, 64, 3), jnp.float32)
  params = jax.eval_shape(models.encoder.init, jax.random.key(0), images)['params']
  compiled = jax.jit(lambda p, x: models.encoder.apply({'params': p}, x)).lower(
      params, images).compile()
  xla = compiled.cost_analysis()['flops']
  shape = models.step_shape()
  analytic = 4 * flops_lib.encoder_forward_flops(shape.num_patches, shape, shape.num_patches)
  # Hand count, S/8 at 64 px: N = 64 tokens, D = 384, F = 1536, patch 8x8x3.
  n, d, f = 64, 384, 1536
  hand = 4 * (2 * n * 192 * d + 2 * (8 * n * d * d + 4 * n * n * d + 4 * n * d * f))
  assert analytic == hand
  ratio = xla / analytic
  print(f'encoder forward: XLA / analytic = {ratio:.4f}')
  # XLA adds LayerNorm, softmax, GELU and the position embedding: ~1-3% at this width.
  assert 1.0 <= ratio < 1.05


@pytest.mark.slow
def test_step_flops_match_xla():
  """The whole train step on one device (compile only): analytic vs XLA within 5%.

  Measured 1.005 for this shape (S/8, depth 2, 64 px, predictor 2 x 192, float32); 0.977 for
  B/16 depth 2 at 224, 1.033 for the tiny Ti/4 of the CLI test (elementwise work weighs more at
  width 192). The analytic count overstates two things (the predictor's input Dense is counted
  on M x (Kc + Kt) tokens, but runs once on Kc; the context encoder's patch embedding gets no
  input gradient, so its backward is 1x, not 2x, its forward) and leaves out the elementwise work.
  Remat ('full') makes XLA count the recomputed forward too (measured 1.13 at B/16): that is the
  hardware FLOPs, which MFU by convention leaves out.
  """
  config = _cfg('--variant', 'S/8', '--depth', '2', '--image_size', '64', '--batch_size', '8',
                '--pred_depth', '2', '--pred_width', '192', '--dtype', 'float32')
  r = bench.run_benchmark(config, compile_only=True, devices=jax.devices()[:1],
                          log=lambda _: None)
  assert r['step_time_s'] is None and r['images_per_s'] is None and r['mfu'] is None
  assert r['compile_s'] > 0 and r['devices'] == 1
  assert r['xla_memory_bytes'] > 0
  ratio = r['xla_flops_per_device'] / r['flops_per_step']
  print(f'train step: XLA / analytic = {ratio:.4f}')
  assert math.isfinite(ratio) and abs(ratio - 1) < 0.05


@pytest.mark.parametrize('argv, match', [
    (['--steps', '0'], '--steps=0'),
    (['--profile_dir', 'p', '--compile_only'], '--profile_dir'),
    (['--profile_dir', 'p', '--profile_steps', '0'], '--profile_dir'),
    (['--batch_size', '0'], '--batch_size=0'),
    (['--variant', 'X/4'], 'Bad ViT variant'),
    (['--context_tokens', '-1'], '--context_tokens'),
])
def test_bad_flags_raise_value_error(argv, match):
  with pytest.raises(ValueError, match=match):
    _cfg(*argv)


def test_small_grid_gets_the_cifar_min_keep():
  assert _cfg('--variant', 'Ti/4', '--image_size', '32').mask.min_keep == 4
  assert _cfg('--variant', 'H/14', '--image_size', '224').mask.min_keep == 10
  assert _cfg('--variant', 'Ti/4', '--image_size', '32', '--min_keep', '6').mask.min_keep == 6
  assert _cfg('--steps', '0', '--compile_only').total_steps >= 1


def test_context_tokens_flag_sets_the_mask_budget():
  # 0 keeps the reference-matching default (11 at 32/4 with min_keep 4); > 0 is the budget Kc.
  small = ('--variant', 'Ti/4', '--image_size', '32')
  assert jepa.build_models(jepa.ModelSpec.from_config(_cfg(*small))).mask_spec.num_context == 11
  models = jepa.build_models(jepa.ModelSpec.from_config(_cfg(*small, '--context_tokens', '22')))
  assert models.mask_spec.num_context == 22 and models.step_shape().context_tokens == 22


@pytest.mark.slow
def test_input_pipeline_benchmark_on_generated_jpegs():
  """benchmarks/input_pipeline.py writes ImageNet-sized JPEGs, reads them, reports images/s."""
  result = subprocess.run(
      [sys.executable, 'benchmarks/input_pipeline.py', '--generate=24', '--image_size=32',
       '--batch_size=8', '--steps=2', '--warmup_steps=1', '--json'],
      cwd=REPO, capture_output=True, text=True, timeout=300,
      env=dict(os.environ, JAX_PLATFORMS='cpu', TF_CPP_MIN_LOG_LEVEL='3'))
  assert result.returncode == 0, result.stderr[-2000:]
  out = json.loads(result.stdout.strip().splitlines()[-1])
  assert out['generated'] == 24 and out['dataset'] == 'image_folder'
  assert sorted(out['loaders']) == ['grain/array_record', 'grain/image_folder', 'tf/image_folder']
  for row in out['loaders'].values():
    assert row['images_per_s'] > 0 and row['images_per_s_per_core'] > 0
    assert row['data_skipped'] == 0
  assert not out['loaders']['grain/array_record']['tensorflow_imported']  # Grain rows run first.


# benchmarks/gpu_suite.sh --dry-run: its CPU matrix, one run each (see the script).
DRY_RUNS = ('tiny', 'tiny_cudnn')


@pytest.mark.slow
def test_gpu_suite_dry_run(tmp_path):
  """The H200 suite end to end on tiny shapes: every run a JSON line, a profile, a summary."""
  out = tmp_path / 'suite'
  env = dict(os.environ, PYTHON=sys.executable, TF_CPP_MIN_LOG_LEVEL='3')
  # One device, and the tests' cheaper XLA:CPU compile (tests/conftest.py); the suite adds its
  # own flags after these.
  env['XLA_FLAGS'] = TEST_XLA_CPU_FLAGS
  proc = subprocess.run(['bash', str(SUITE), str(out), '--dry-run'], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=600, check=False)
  assert proc.returncode == 0, (proc.stdout[-3000:], proc.stderr[-3000:])
  rows = [json.loads(line) for line in (out / 'results.jsonl').read_text().splitlines()]
  assert tuple(r['name'] for r in rows) == DRY_RUNS
  by_name = {r['name']: r for r in rows}
  for name in DRY_RUNS[:-1]:
    r = by_name[name]
    assert r['status'] == 'ok', r
    assert r['tensorflow_imported'] is False and r['platform'] == 'cpu'
    assert (r['variant'], r['depth'], r['image_size'], r['batch_size']) == ('Ti/4', 1, 32, 8)
    for key in ('images_per_s', 'step_time_s', 'tflops', 'mfu', 'compile_s', 'wall_s'):
      assert r[key] > 0, (name, key)
    assert r['finite'] is True
  assert by_name['tiny']['profile_steps'] == 2 and by_name['tiny']['profile_error'] is None
  assert (by_name['tiny']['scan'], by_name['tiny']['remat']) == (
      True, 'dots_with_no_batch_dims_saveable')
  assert 'latency_hiding_scheduler=true' in by_name['tiny']['xla_flags']
  assert 'latency_hiding' not in by_name['tiny_cudnn']['xla_flags']
  # cuDNN attention is refused on the CPU: recorded as an error, and the suite went on.
  cudnn = by_name['tiny_cudnn']
  assert cudnn['status'] == 'error' and 'cudnn' in cudnn['error'] and cudnn['rc'] == 2
  # The profile comes back as one archive (the device tool returns files 2 folders deep at most).
  assert not (out / 'profile').exists()
  with tarfile.open(out / 'profile.tar.gz') as tar:
    names = [m.name for m in tar.getmembers() if m.isfile()]
  assert any(n.startswith('profile/tiny/') and n.endswith('.xplane.pb') for n in names), names
  assert any(n.endswith('perfetto_trace.json.gz') for n in names), names
  summary = (out / 'summary.md').read_text()
  assert '| tiny (Ti/4 d1, b8, scan, remat dots_with_no_batch_dims_saveable) | ok |' in summary
  assert '| tiny_cudnn | error:' in summary
  assert '1 of 2 runs ok.' in summary and 'Top ' in summary
  files = sorted(p.name for p in out.iterdir())
  assert files == ['env.txt', 'nvidia-smi-q.txt', 'nvidia-smi.txt', 'profile.tar.gz',
                   'results.jsonl', 'suite.log', 'summary.md']
  if shutil.which('nvidia-smi') is None:
    assert (out / 'nvidia-smi.txt').read_text().strip() == 'absent'
  assert 'tensorflow imported False' in (out / 'env.txt').read_text()


def test_gpu_suite_is_shellcheck_clean():
  assert subprocess.run(['bash', '-n', str(SUITE)], check=False).returncode == 0
  if shutil.which('shellcheck') is None:
    pytest.skip('shellcheck is not installed')
  proc = subprocess.run(['shellcheck', str(SUITE)], capture_output=True, text=True, check=False)
  assert proc.returncode == 0, proc.stdout


def _record(tmp_path, rc, stdout='', stderr='', skipped=''):
  (tmp_path / 'out').write_text(stdout)
  (tmp_path / 'err').write_text(stderr)
  args = report.argparse.Namespace(
      name='H14', rc=rc, wall_s=3.0, stdout=str(tmp_path / 'out'), stderr=str(tmp_path / 'err'),
      xla_flags='', args='--variant H/14', skipped=skipped)
  return report.record(args)


def test_suite_report_record_statuses(tmp_path):
  line = json.dumps({'images_per_s': 500.0, 'tensorflow_imported': False})
  assert _record(tmp_path, 0, 'log line\n' + line)['status'] == 'ok'
  tf = _record(tmp_path, 0, json.dumps({'images_per_s': 500.0, 'tensorflow_imported': True}))
  assert tf['status'] == 'error' and 'TensorFlow' in tf['error']
  assert _record(tmp_path, 0, json.dumps({'images_per_s': 1.0}))['status'] == 'error'
  late = _record(tmp_path, 124, 'compiling', 'still compiling')
  assert late['status'] == 'timeout' and late['error'] == 'still compiling'
  oom = _record(tmp_path, 1, '', 'Traceback\nRESOURCE_EXHAUSTED: out of memory')
  assert oom['status'] == 'error' and oom['error'].endswith('out of memory')
  assert _record(tmp_path, 0, skipped='budget')['status'] == 'skipped'


def test_suite_report_table_mfu_against_both_peaks():
  row = dict(name='H14_scan', status='ok', variant='H/14', depth=32, batch_size=128, scan=True,
             remat='none', attention='xla', platform='gpu', devices=1, images_per_s=600.0,
             step_time_s=0.2133, step_time_min_s=0.21, step_time_max_s=0.22, tflops=395.5,
             peak_memory_bytes=40 * 2**30, compile_s=30.0)
  text = report.table([row, dict(row, name='H14_cudnn', images_per_s=660.0, attention='cudnn'),
                       dict(name='H14', status='timeout', error='compiling')], 'H14_scan')
  lines = text.splitlines()
  assert lines[2] == ('| H14_scan (H/14 d32, b128, scan) | ok | 600.0 | 213.3 (210.0 / 220.0) | '
                      '395.5 | 40.0% | 50.1% | 40.00 | 30.0 | 1.000 |')
  assert lines[3].endswith('| 1.100 |')
  assert lines[4].startswith('| H14 | timeout: compiling |') and lines[4].count('|') == 11


# benchmarks/reference_step.py: the side-by-side harness's own logic (no reference checkout needed).
REF_SCRIPT = REPO / 'benchmarks' / 'reference_step.py'


def _ref_module():
  return _load_module('reference_step', REF_SCRIPT)


def test_reference_harness_shapes_and_flags():
  rs = _ref_module()
  a = rs.parse_args(['--which', 'project', '--shape', 'cifar', '--cpus', '0'])
  assert (a.depth, a.batch_size, a.pred_depth, a.pred_width) == (4, 64, 3, 96)
  assert a.threads == 1 and a.cpu_list == [0]
  a = rs.parse_args(['--which', 'project', '--depth', '2', '--threads', '3', '--cpus', '0-2,5'])
  assert (a.depth, a.batch_size, a.pred_depth, a.pred_width) == (2, 128, 6, 192)
  assert a.cpu_list == [0, 1, 2, 5] and a.threads == 3
  argv = rs.project_argv(a)
  assert argv[argv.index('--dtype') + 1] == 'float32'
  assert argv[argv.index('--depth') + 1] == '2' and argv[argv.index('--min_keep') + 1] == '4'
  with pytest.raises(SystemExit):  # Timing the reference needs its checkout.
    rs.parse_args(['--which', 'both', '--reference_dir', ''])
  cmd = rs.child_command(a, 'reference', ['--rounds', '3', '--which=both', '--json', '--shape',
                                          'cifar'])
  assert cmd[2:] == ['--shape', 'cifar', '--which', 'reference', '--json']


def test_reference_harness_masks_follow_the_project_config():
  rs = _ref_module()
  from cjepa_jax import config as config_lib
  m = config_lib.default_config().mask
  kw = rs.mask_settings(4)
  assert kw['pred_mask_scale'] == tuple(m.pred_scale) and kw['enc_mask_scale'] == tuple(
      m.enc_scale)
  assert kw['aspect_ratio'] == tuple(m.pred_aspect) and (kw['nenc'], kw['npred']) == (1, 4)
  assert kw['min_keep'] == 4 and kw['allow_overlap'] is False
  assert kw['input_size'] // kw['patch_size'] == 8


def test_reference_harness_ratio_of_medians_and_rounds():
  rs = _ref_module()
  runs = [dict(which='project', round=0, images_per_s=40.0),
          dict(which='reference', round=0, images_per_s=80.0),
          dict(which='reference', round=1, images_per_s=50.0),
          dict(which='project', round=1, images_per_s=50.0),
          dict(which='project', round=2, images_per_s=60.0),
          dict(which='reference', round=2, images_per_s=60.0)]
  s = rs.summarise(runs)
  assert s['project_images_per_s'] == 50.0 and s['reference_images_per_s'] == 60.0
  assert s['ratio'] == pytest.approx(50 / 60)
  assert s['ratios'] == pytest.approx([0.5, 1.0, 1.0])
  assert rs.summarise([dict(which='project', round=0, images_per_s=1.0)])['ratio'] is None


def test_reference_harness_profile_attribution():
  rs = _ref_module()
  hlo = '\n'.join([
      'fused_computation.1 (p0: f32[4]) -> f32[4] {',
      '  p0 = f32[4] parameter(0)',
      '  ROOT m = f32[4] multiply(p0, p0), metadata={op_name="jit(s)/optimizer/mul"}',
      '}',
      'ENTRY main.9 (a: f32[4]) -> f32[4] {',
      '  a = f32[4] parameter(0)',
      '  fusion.1 = f32[4] fusion(a), kind=kLoop, calls=fused_computation.1',
      '  ROOT ynn_fusion.2 = f32[4] fusion(fusion.1), kind=kCustom, calls=c, metadata={op_name='
      '"jit(s)/transpose(jvp(Predictor))/blocks_0/mlp/fc1/dot_general"}',
      '}'])
  names = rs.parse_hlo_op_names(hlo)
  assert names['fusion.1'] == 'jit(s)/optimizer/mul'
  assert rs.classify_op(names['ynn_fusion.2']) == ('MLP: fc1, GELU, fc2', 'backward')
  assert rs.classify_op('jit(s)/target/Encoder/blocks_1/attn/qkv/dot_general') == (
      'attention: qkv / proj GEMMs', 'target forward')
  assert rs.classify_op('jit(s)/jvp(Encoder)/blocks_1/attn/vmap(x)/exp')[0].startswith(
      'attention: scores')
  assert rs.classify_op('jit(s)/monitoring/sqrt')[0] == 'monitoring outputs'
  rows = rs.tabulate({('a', '-'): 1.0, ('b', '-'): 3.0})
  assert [r['category'] for r in rows] == ['b', 'a'] and rows[0]['share'] == 0.75


def test_reference_collator_tokens_match_the_project(tmp_path):
  """With a reference checkout ($IJEPA_REFERENCE_DIR) and torch: its MaskCollator, given the
  harness's settings, makes target blocks of the project's size range and a context within the
  project's budget range."""
  ref = os.environ.get('IJEPA_REFERENCE_DIR', '')
  if not ref or not os.path.isdir(os.path.join(ref, 'src', 'masks')):
    pytest.skip('no reference checkout: set IJEPA_REFERENCE_DIR')
  torch = pytest.importorskip('torch')
  rs = _ref_module()
  sys.path.insert(0, ref)
  try:
    from src.masks.multiblock import MaskCollator  # pylint: disable=import-outside-toplevel
  finally:
    sys.path.remove(ref)
  collator = MaskCollator(**rs.mask_settings(4))
  shape = jepa.build_models(jepa.ModelSpec.from_config(_cifar_config())).step_shape()
  for _ in range(5):
    _, enc, pred = collator([(torch.zeros(3, 32, 32), 0) for _ in range(16)])
    assert len(enc) == 1 and len(pred) == 4
    assert 4 < pred[0].shape[1] <= shape.target_tokens
    assert 4 < enc[0].shape[1] <= 64


def _cifar_config():
  from cjepa_jax import config as config_lib
  c = config_lib.default_config()
  c.model.variant, c.model.depth, c.data.image_size = 'Ti/4', 4, 32
  c.model.pred_depth, c.model.pred_width, c.mask.min_keep = 3, 96, 4
  return c


def test_cpu_flags_merge_keeps_the_users_own_values(monkeypatch):
  from jax._src import xla_bridge
  from cjepa_jax import cpu_flags
  monkeypatch.setattr(xla_bridge, 'backends_are_initialized', lambda: False)
  opt = cpu_flags.CPU_FLAGS[0].split('=')[0]
  assert cpu_flags.merged('') == ' '.join(cpu_flags.CPU_FLAGS)
  base = '--xla_force_host_platform_device_count=8'
  assert cpu_flags.merged(base).split() == [base, *cpu_flags.CPU_FLAGS]
  mine = f'{base} {opt}=dot'
  assert cpu_flags.merged(mine) == mine  # The user's value of the option wins.
  env = {'XLA_FLAGS': base}
  assert cpu_flags.apply(env) == env['XLA_FLAGS'] == cpu_flags.merged(base)
  assert cpu_flags.apply(env) == cpu_flags.merged(base)  # Idempotent.
  off = {'XLA_FLAGS': base, cpu_flags.DISABLE_ENV: '0'}
  assert cpu_flags.apply(off) == base and off['XLA_FLAGS'] == base
  monkeypatch.setattr(xla_bridge, 'backends_are_initialized', lambda: True)
  late = {'XLA_FLAGS': base}  # Too late to take effect: left as it is.
  assert cpu_flags.apply(late) == base and late['XLA_FLAGS'] == base
