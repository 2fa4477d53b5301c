"""The `cjepa_jax.train` entry point: recipes, config errors, metrics, exact resume after SIGKILL."""

import importlib.util
import json
import os
import pathlib
import re
import signal
import subprocess
import sys
import textwrap
import time

import jax
import numpy as np
import pytest

from cjepa_jax.checkpoint import manager as ckpt_manager
from cjepa_jax.checkpoint import reading as ckpt_reading
from cjepa_jax import config as config_lib
from cjepa_jax import loop
from cjepa_jax import metrics as metrics_lib
from cjepa_jax import optim
from cjepa_jax import train
from cjepa_jax import train_step as step_lib
from cjepa_jax.models import jepa
from multiprocess_utils import xla_flags

ROOT = pathlib.Path(__file__).resolve().parents[1]
RECIPES = sorted((ROOT / 'configs').glob('*.py'))
RECIPE_ARGS = {'cjepa_in1k_ep600.py': ['B/16', 'L/16'],
               'cifar10_vit_tiny.py': ['ijepa', 'cjepa', 'cjepa_blocks', 'sigreg', 'sigreg_noema']}


def load_recipe(path, arg=None):
  spec = importlib.util.spec_from_file_location(path.stem, path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


def recipe_cases():
  for path in RECIPES:
    if path.name.startswith(('probe_', 'finetune_')):  # Not pretraining recipes.
      continue
    for arg in RECIPE_ARGS.get(path.name, [None]):
      yield pytest.param(path, arg, id=f'{path.stem}:{arg}' if arg else path.stem)


@pytest.mark.parametrize('path,arg', recipe_cases())
def test_every_recipe_builds_and_initialises(path, arg):
  config = load_recipe(path, arg)
  doc = open(path, encoding='utf-8').read().split('"""')[1].strip()
  assert 'python -m cjepa_jax.train --config configs/' + path.name in doc.splitlines()[2] or \
      'python -m cjepa_jax.train --config configs/' + path.name in doc, 'docstring lacks command'
  models = jepa.build_models(jepa.ModelSpec.from_config(config))
  length = optim.RunLength.from_config(config)
  assert length.total_steps == config.epochs * (config.data.num_train_examples // config.batch_size)
  adamw = optim.AdamW.from_config(config)
  tx = optim.make_optimizer(adamw, optim.make_schedules(adamw, length))
  state = jax.eval_shape(lambda: step_lib.init_state(models, tx, 0, config.use_ema))
  n_enc = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state['params']['encoder']))
  assert n_enc > 0
  if config.use_ema:
    n_target = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state['target_params']))
    assert n_enc == n_target
  else:
    assert 'target_params' not in state
  assert models.mask_spec.num_context > 0 and models.mask_spec.max_target > 0


def test_reference_recipes_match_reference_hyperparameters():
  for name, variant, size, pred_depth, epochs, warmup in (
      ('in1k_vith14_ep300', 'H/14', 224, 12, 300, 40),
      ('in1k_vith16_448_ep300', 'H/16', 448, 12, 300, 40),
      ('in22k_vith14_ep66', 'H/14', 224, 12, 66, 3),
      ('in22k_vitg16_ep44', 'g/16', 224, 16, 44, 3)):
    c = load_recipe(ROOT / 'configs' / f'{name}.py')
    assert (c.model.variant, c.data.image_size, c.model.pred_depth, c.epochs,
            c.optim.warmup_epochs) == (variant, size, pred_depth, epochs, warmup), name
    assert (c.batch_size, c.optim.lr, c.optim.start_lr, c.optim.final_lr) == (
        2048, 1e-3, 2e-4, 1e-6)
    assert (c.optim.weight_decay, c.optim.final_weight_decay, tuple(c.optim.ema)) == (
        0.04, 0.4, (0.996, 1.0))
    assert c.model.pred_width == 384 and c.vicreg.weight == 0 and c.model.dtype == 'bfloat16'
  for variant in ('B/16', 'L/16'):
    c = load_recipe(ROOT / 'configs' / 'cjepa_in1k_ep600.py', variant)
    assert (c.epochs, c.optim.start_lr, c.optim.lr, c.optim.warmup_epochs, c.vicreg.weight) == (
        600, 1e-4, 1e-3, 15, 0.001)
    assert (c.vicreg.sim_coeff, c.vicreg.std_coeff, c.vicreg.cov_coeff) == (25, 25, 1)


def test_cifar_recipe_gives_each_objective_its_tuned_settings():
  """RESULTS.md's tuning: I-JEPA Kc 22 at lr 2.5e-4; both C-JEPA modes keep Kc 11 at lr 1e-3;
  SIGReg at lr 5e-4 (1e-3 grew its gradients), weight 0.01 with EMA and 0.05 without."""
  # objective: (Kc, lr, start lr, VICReg weight, SIGReg weight, EMA)
  want = {'ijepa': (22, 2.5e-4, 5e-5, 0.0, 0.0, True),
          'cjepa': (11, 1e-3, 2e-4, 0.001, 0.0, True),
          'cjepa_blocks': (11, 1e-3, 2e-4, 0.001, 0.0, True),
          'sigreg': (11, 5e-4, 1e-4, 0.0, 0.01, True),
          'sigreg_noema': (11, 5e-4, 1e-4, 0.0, 0.05, False)}
  for objective, expected in want.items():
    c = load_recipe(ROOT / 'configs' / 'cifar10_vit_tiny.py', objective)
    got = (jepa.build_models(jepa.ModelSpec.from_config(c)).mask_spec.num_context, c.optim.lr,
           c.optim.start_lr,
           c.vicreg.weight, c.sigreg.weight, c.use_ema)
    assert got == expected, (objective, got)
    assert tuple(c.optim.ema) == (0.996, 1.0) and c.mask.min_keep == 4


def tiny_cli_config(**overrides):
  c = load_recipe(ROOT / 'configs' / 'cifar10_vit_tiny.py')
  c.data.dataset = 'synthetic'
  c.batch_size = 16
  c.total_steps = 6
  c.model.depth = 1
  c.model.pred_depth = 1
  c.model.pred_width = 48
  c.log_every_steps = 2
  c.evals.knn.every_steps = 0  # The kNN monitor is tested on its own (test_probe.py).
  c.update_from_flattened_dict(overrides)  # Dotted keys, e.g. 'model.depth'.
  return c


@pytest.mark.parametrize('overrides,message', [
    ({'model.variant': 'X/16'}, 'Ti'),
    ({'model.variant': 'Ti/5'}, 'divisible'),
    ({'batch_size': 12}, 'not divisible by the 8 batch shards'),
    ({'mesh.data': 3, 'mesh.fsdp': 2}, 'devices'),
    ({'data.dataset': 'no_such_dataset'}, 'no_such_dataset'),
    ({'data.dataset': 'image_folder', 'data.data_dir': '/nonexistent/cifar'}, '/nonexistent'),
    ({'vicreg.mode': 'both'}, "'context' or 'blocks'"),
    ({'model.dtype': 'float64'}, 'bfloat16'),
    ({'model.attention': 'flash'}, "'xla', 'cudnn'"),
    ({'model.attention': 'cudnn'}, 'needs an NVIDIA GPU'),
    ({'optim.lr': -1.0}, 'config.optim.lr=-1.0 is invalid'),
    ({'optim.start_lr': -1e-4}, 'config.optim.start_lr'),
    ({'optim.final_lr': float('nan')}, 'config.optim.final_lr'),
    ({'optim.weight_decay': -0.1}, 'config.optim.weight_decay'),
    ({'optim.ema': (0.996, 1.5)}, 'in [0, 1]'),
    ({'optim.b2': 1.0}, 'config.optim.b2'),
    ({'vicreg.weight': -0.001}, 'config.vicreg.weight'),
    ({'sigreg.weight': -0.05}, 'config.sigreg.weight'),
    ({'sigreg.num_slices': 0}, 'config.sigreg.num_slices'),
    ({'data.num_classes': 1}, 'config.data.num_classes'),
    ({'log_every_steps': 0}, 'config.log_every_steps'),
    ({'mask.pred_scale': (0.5, 0.9)}, 'the 8x8 grid holds at most 7x7'),
])
def test_config_errors_name_the_problem(tmp_path, overrides, message):
  config = tiny_cli_config(**overrides)
  with pytest.raises(ValueError, match=None) as e:
    train.train_and_evaluate(config, str(tmp_path))
  assert message in str(e.value), str(e.value)


def tiny_cli_args(workdir, *extra):
  """The CIFAR recipe shrunk to a tiny model on synthetic data, as command-line flags."""
  return ['--config', 'configs/cifar10_vit_tiny.py', '--workdir', str(workdir),
          '--config.data.dataset=synthetic', '--config.batch_size=16', '--config.model.depth=1',
          '--config.model.pred_depth=1', '--config.model.pred_width=48',
          '--config.log_every_steps=2', '--config.evals.knn.every_steps=0', *extra]


def run_python(args, devices=1, timeout=600, **env_extra):
  env = dict(os.environ, XLA_FLAGS=xla_flags(devices),
             JAX_PLATFORMS='cpu', TF_CPP_MIN_LOG_LEVEL='3', **env_extra)
  return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True,
                        text=True, timeout=timeout)


def run_cli(workdir, *extra, devices=1):
  return run_python(['-m', 'cjepa_jax.train', *tiny_cli_args(workdir, *extra)], devices=devices)


def read_metrics(workdir):
  rows = [json.loads(line) for line in open(workdir / 'metrics.jsonl', encoding='utf-8')]
  return {r['step']: r for r in rows}  # A resumed run re-logs steps: the last row wins.


METRIC_KEYS = ('loss', 'jepa', 'lr', 'weight_decay', 'ema_momentum', 'grad_norm',
               'update_norm', 'param_norm', 'target_feature_std', 'target_effective_rank',
               'images_per_s', 'step_time_s', 'eval_s', 'tflops', 'mfu', 'compiles',
               'data_skipped')


@pytest.fixture(scope='module')
def straight_run(tmp_path_factory):
  """An uninterrupted 12-step CLI run on one device, checkpointing every 4 steps, with the
  few-shot monitor at its last step (the runs it is compared with have none: evaluations never
  change the training)."""
  workdir = tmp_path_factory.mktemp('straight')
  result = run_cli(workdir, '--config.total_steps=12', '--config.ckpt_every_steps=4',
                   '--config.evals.fewshot.every_steps=12', '--config.evals.fewshot.shots=(1,2)',
                   '--config.evals.fewshot.seeds=2', '--config.evals.fewshot.train_examples=160',
                   '--config.evals.fewshot.eval_examples=64')
  assert result.returncode == 0, result.stderr[-3000:]
  return workdir, result


def check_logged_run(workdir, result, steps):
  rows = read_metrics(workdir)
  assert sorted(rows) == list(range(2, steps + 1, 2))
  for key in METRIC_KEYS:
    assert key in rows[steps], key
  # The recipe is I-JEPA: VICReg's terms play no part, so they are not logged.
  assert not [k for k in rows[steps] if k.startswith('vicreg')], rows[steps]
  assert all(r['compiles'] == 1 for r in rows.values())
  assert all(np.isfinite(r['loss']) for r in rows.values())
  # The step computes RankMe on log steps only (NaN otherwise); every logged value is real.
  assert all(r['target_effective_rank'] > 1.0 for r in rows.values())
  assert rows[steps]['images_per_s'] > 0 and rows[steps]['tflops'] > 0
  assert all(0 <= r['eval_s'] < 60 for r in rows.values())
  config = json.load(open(workdir / 'config.json', encoding='utf-8'))
  assert config['total_steps'] == steps and config['data']['dataset'] == 'synthetic'
  assert list(workdir.glob('events.out.tfevents.*')), 'no TensorBoard events'
  assert f'step {steps}/{steps}' in result.stderr  # The console progress line.
  assert ckpt_manager.Checkpointer(str(workdir)).latest_step() == steps


@pytest.mark.slow
def test_cli_trains_and_logs_metrics_on_one_device(straight_run):
  check_logged_run(*straight_run, steps=12)
  rows = read_metrics(straight_run[0])
  # The in-training few-shot monitor lands in metrics.jsonl on its steps only.
  assert 0.0 <= rows[12]['fewshot_1shot'] <= 100.0 and 0.0 <= rows[12]['fewshot_2shot'] <= 100.0
  assert rows[12]['unit'] == 'percent' and 'unit' not in rows[10]   # In %, and the row says so.
  assert not [k for k in rows[10] if k.startswith('fewshot')]
  # eval_s times the log step's evaluations: RankMe alone (milliseconds) at step 10, plus the
  # few-shot monitor (its feature pass compiles) at step 12.
  assert rows[12]['eval_s'] > rows[10]['eval_s'] + 0.1, (rows[10]['eval_s'], rows[12]['eval_s'])


@pytest.mark.slow
def test_renamed_config_keys_still_work_through_the_cli_with_a_warning(tmp_path):
  # ml_collections reads `--config.*` overrides from sys.argv itself: the rewrite must reach it.
  result = run_cli(tmp_path / 'run', '--config.total_steps=2', '--config.evals.knn_every_steps=0',
                   '--config.evals.fewshot_every_steps=0')
  assert result.returncode == 0, result.stderr[-3000:]
  warnings = [l for l in result.stderr.splitlines() if 'is deprecated' in l]
  assert len(warnings) == 2 and '--config.evals.knn.every_steps' in warnings[0], warnings


def test_misspelled_config_key_is_one_line_and_leaves_no_workdir(tmp_path):
  workdir = tmp_path / 'run'
  result = run_cli(workdir, '--config.totl_steps=6')
  assert result.returncode == 1
  lines = [l for l in result.stderr.splitlines() if l.strip()]
  assert lines == ["cjepa-train: error: unknown config key 'totl_steps': did you mean "
                   "'total_steps'? (--help lists every key)"], result.stderr
  assert not workdir.exists()


@pytest.mark.slow
def test_bad_flag_and_bad_value_are_one_line_each(tmp_path):
  for extra, needle in ((('--no_such_flag=1',), 'no_such_flag'),
                        (('--config.optim.lr=-1',), 'config.optim.lr=-1.0 is invalid'),
                        (('--config.batch_size=abc',), 'batch_size')):
    result = run_cli(tmp_path / 'run', *extra)
    assert result.returncode == 1, (extra, result.stderr[-2000:])
    # The word, not a substring: some TensorFlow builds log a oneDNN notice about round-off
    # "errors".
    errors = [l for l in result.stderr.splitlines() if re.search(r'\berror\b', l.lower())]
    assert len(errors) == 1 and errors[0].startswith('cjepa-train: error: '), result.stderr
    assert needle in errors[0], errors
    assert 'Traceback' not in result.stderr
    assert not (tmp_path / 'run').exists()


def test_help_lists_every_config_key_with_default_and_meaning():
  result = run_python(['-m', 'cjepa_jax.train', '--help'])
  assert result.returncode == 0, result.stderr[-2000:]
  for key, default, meaning in config_lib.describe_keys():
    assert f'--config.{key} (default {default!r}): {meaning}' in result.stdout, key
    assert meaning, f'config.{key} has no comment in config.py'
  assert '--workdir' in result.stdout and '--config:' in result.stdout


# The child process: the real entry point, with Checkpointer.save patched to SIGKILL the process
# while the checkpoint of a chosen step is being written (after the previous one is durable).
_KILL_HARNESS = textwrap.dedent('''
    import os, signal, sys
    from cjepa_jax import train
    from cjepa_jax.checkpoint import manager as ckpt_manager
    kill_step = int(os.environ['KILL_AT'])
    original = ckpt_manager.Checkpointer.save
    def save(self, step, state, config=None, **kwargs):
      if step == kill_step:
        self.wait()
      result = original(self, step, state, config, **kwargs)
      if step == kill_step:
        os.kill(os.getpid(), signal.SIGKILL)   # The async save is still in flight.
      return result
    ckpt_manager.Checkpointer.save = save
    sys.argv = ['train'] + sys.argv[1:]
    train.run()
''')


def run_killed(workdir, kill_at, *extra):
  return run_python(['-c', _KILL_HARNESS, *tiny_cli_args(workdir, *extra)], KILL_AT=str(kill_at))


@pytest.mark.slow
def test_non_finite_loss_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path,
                                                                           monkeypatch):
  """A NaN batch at step 6 (checkpoints every 4): the error names step 6, step 4 stays latest."""
  from cjepa_jax.data import input_pipeline  # pylint: disable=g-import-not-at-top
  real = input_pipeline.make_train_iterator

  def poisoned(config, *, start_step=0, **kwargs):
    for step, batch in enumerate(real(config, start_step=start_step, **kwargs),
                                 start=start_step + 1):
      if step == 6:
        batch = dict(batch, image=np.full_like(batch['image'], np.nan))
      yield batch

  monkeypatch.setattr(input_pipeline, 'make_train_iterator', poisoned)
  config = tiny_cli_config(total_steps=12, ckpt_every_steps=4)
  with pytest.raises(metrics_lib.NonFiniteError, match='step 6') as e:
    train.train_and_evaluate(config, str(tmp_path))
  assert 'last good checkpoint (step 4)' in str(e.value)
  assert str(e.value).count('\n') == 0
  ckpt = ckpt_manager.Checkpointer(str(tmp_path))
  assert ckpt.all_steps() == [4]
  rows = read_metrics(tmp_path)
  assert sorted(rows) == [2, 4]  # Nothing non-finite was logged either.


@pytest.mark.slow
def test_non_finite_loss_before_any_checkpoint_names_none(tmp_path, monkeypatch):
  from cjepa_jax.data import input_pipeline  # pylint: disable=g-import-not-at-top
  real = input_pipeline.make_train_iterator

  def poisoned(config, *, start_step=0, **kwargs):
    for batch in real(config, start_step=start_step, **kwargs):
      yield dict(batch, image=np.full_like(batch['image'], np.nan))

  monkeypatch.setattr(input_pipeline, 'make_train_iterator', poisoned)
  with pytest.raises(metrics_lib.NonFiniteError, match='step 1') as e:
    train.train_and_evaluate(tiny_cli_config(total_steps=4, ckpt_every_steps=4), str(tmp_path))
  assert 'No checkpoint was written before it.' in str(e.value)
  assert 'last good' not in str(e.value)


# SIGTERM, a real one: the child sends it to itself when the loop asks about step SIGNAL_AT (the
# handler runs in the main thread between bytecodes, as for a signal from outside).
_SIGTERM_HARNESS = textwrap.dedent('''
    import os, signal, sys
    from cjepa_jax import preemption, train
    at = int(os.environ['SIGNAL_AT'])
    sig = getattr(signal, os.environ.get('SIGNAL', 'SIGTERM'))
    original = preemption.Preemption.reached
    # One unreadable image per step, as the input pipeline would report it (`data_skipped`).
    from cjepa_jax.data import input_pipeline
    real_iterator = input_pipeline.make_train_iterator
    def skipping(config, *, start_step=0, **kwargs):
      for i, batch in enumerate(real_iterator(config, start_step=start_step, **kwargs), 1):
        yield dict(batch, data_skipped=i)
    input_pipeline.make_train_iterator = skipping
    def reached(self, step):
      if step == at:
        os.kill(os.getpid(), sig)
      return original(self, step)
    preemption.Preemption.reached = reached
    sys.argv = ['train'] + sys.argv[1:]
    train.run()
''')


def test_ctrl_c_asks_for_the_same_stop_and_twice_stops_at_once():
  """SIGINT takes SIGTERM's path (checked end to end below); a second Ctrl-C is not caught."""
  from cjepa_jax import preemption  # pylint: disable=g-import-not-at-top
  # Python's own Ctrl-C handler before the run, whatever an earlier test or library left
  # installed (in the full suite something leaves another one): the second Ctrl-C must reach it.
  outer = signal.signal(signal.SIGINT, signal.default_int_handler)
  before = signal.getsignal(signal.SIGINT)
  try:
    _ctrl_c_twice(preemption, before)
  finally:
    signal.signal(signal.SIGINT, outer)


def _ctrl_c_twice(preemption, before):
  with preemption.Preemption() as preempt:
    assert not preempt.reached(1)
    os.kill(os.getpid(), signal.SIGINT)   # Real signal; the handler runs before the next line.
    assert preempt.reached(2) and preempt.signal_name == 'SIGINT'
    os.kill(os.getpid(), signal.SIGTERM)  # Another signal while stopping: ignored.
    assert preempt.signal_name == 'SIGINT'
    with pytest.raises(KeyboardInterrupt):  # The same one again: the default behaviour.
      os.kill(os.getpid(), signal.SIGINT)
  assert signal.getsignal(signal.SIGINT) is before


@pytest.mark.slow
def test_preempted_then_killed_mid_save_then_resumed_ends_exactly(tmp_path, straight_run):
  """12 steps straight == SIGTERM at step 5, resume, SIGKILL while step 8 is saved, resume.

  Checkpoints every 4 steps. The SIGTERM saves step 5 (which would otherwise be lost) and exits
  75. The resumed run computes steps 6-8 and is killed while step 8's checkpoint is being written
  (lost work, redone): the half-written step 8 is reported, moved aside, and the last run resumes
  from step 5. Bitwise equality: same program, same inputs (masks from fold_in(rng, step), data
  position from the step), same CPU.
  """
  straight, _ = straight_run
  workdir = tmp_path / 'run'
  common = ('--config.total_steps=12', '--config.ckpt_every_steps=4')
  result = run_python(['-c', _SIGTERM_HARNESS, *tiny_cli_args(workdir, *common)],
                      SIGNAL_AT='5')
  assert result.returncode == 75, result.stderr[-3000:]
  assert 'SIGTERM received' in result.stderr and 'saved the checkpoint of step 5' in result.stderr
  assert ckpt_manager.Checkpointer(str(workdir)).all_steps() == [4, 5]

  killed = run_killed(workdir, 8, *common)
  assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
  assert 'Resuming from the checkpoint of step 5' in killed.stderr
  assert ckpt_manager.Checkpointer(str(workdir)).latest_step() == 5

  resumed = run_cli(workdir, *common)
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  assert 'Resuming from the checkpoint of step 5' in resumed.stderr
  assert list((workdir / 'checkpoints').glob('8.incomplete-*')), 'the cut-off save stays'
  a, b = read_metrics(straight), read_metrics(workdir)
  assert sorted(a) == sorted(b) == [2, 4, 6, 8, 10, 12]
  # The 5 images skipped before the preemption are kept in the checkpoint and still counted after
  # both restarts (whose own pipelines skip none).
  assert b[4]['data_skipped'] == 4 and b[12]['data_skipped'] == 5
  for step in (8, 10, 12):  # Step 6's window lost step 5 to the restart; the later ones are whole.
    for key in ('loss', 'jepa', 'lr', 'weight_decay', 'ema_momentum', 'grad_norm', 'param_norm'):
      assert a[step][key] == b[step][key], (step, key)
  la = jax.tree.leaves(ckpt_reading.restore_subtree(str(straight), ()))
  lb = jax.tree.leaves(ckpt_reading.restore_subtree(str(workdir), ()))
  for x, y in zip(la, lb, strict=True):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def _copy_run(src, dst):
  import shutil  # pylint: disable=g-import-not-at-top
  shutil.copytree(src, dst)
  return dst


@pytest.mark.slow
def test_rerunning_a_finished_run_says_already_complete(tmp_path, straight_run):
  workdir = _copy_run(straight_run[0], tmp_path / 'run')
  before = sorted(p.name for p in (workdir / 'checkpoints').iterdir())
  result = run_cli(workdir, '--config.total_steps=12', '--config.ckpt_every_steps=4')
  assert result.returncode == 0, result.stderr[-3000:]
  assert 'already complete at step 12' in result.stderr
  assert 'compiled 0 times' not in result.stderr
  assert sorted(p.name for p in (workdir / 'checkpoints').iterdir()) == before


@pytest.mark.slow
def test_resume_refuses_config_drift_and_keeps_config_json(tmp_path, straight_run, caplog):
  workdir = _copy_run(straight_run[0], tmp_path / 'run')
  saved = (workdir / 'config.json').read_text()
  common = dict(total_steps=14, ckpt_every_steps=4)
  # A change of shapes: refused, whatever allow_config_change says, with the way forward.
  with pytest.raises(ValueError) as e:
    train.train_and_evaluate(tiny_cli_config(**common, **{'model.pred_width': 96},
                                             allow_config_change=True), str(workdir))
  assert 'model.pred_width: 48 -> 96' in str(e.value) and 'init_from' in str(e.value)
  # A change of meaning: refused unless allowed, in one line.
  with pytest.raises(ValueError) as e:
    train.train_and_evaluate(tiny_cli_config(**common, batch_size=8, **{'optim.lr': 1e-3}),
                             str(workdir))
  line = str(e.value)
  assert '\n' not in line and 'batch_size: 16 -> 8' in line, line
  old_lr = tiny_cli_config().optim.lr  # The recipe's (`ijepa`), whatever it is tuned to.
  assert f'optim.lr: {old_lr} -> 0.001' in line and 'allow_config_change=True' in line
  assert (workdir / 'config.json').read_text() == saved  # Failed starts leave it alone.
  # Allowed: logged key by key; config.json then describes the new start (written by the trainer
  # after its first step), and the old one is kept.
  caplog.set_level('WARNING')
  allowed = tiny_cli_config(**common, **{'optim.lr': 1e-3}, allow_config_change=True)
  loop.check_resume_config(json.loads(saved), loop.RunSpec.from_config(allowed), 'its step dir')
  assert f'changed config (allow_config_change): optim.lr {old_lr} -> 0.001' in caplog.text
  config_lib.save_json(loop.RunSpec.from_config(allowed).config_json, str(workdir), start_step=12)
  assert (workdir / 'config.12.json').read_text() == saved
  assert json.loads((workdir / 'config.json').read_text())['optim']['lr'] == 1e-3


def test_unwritable_checkpoint_directory_fails_before_compiling(tmp_path):
  blocker = tmp_path / 'file'
  blocker.write_text('not a directory')
  config = tiny_cli_config(total_steps=4)
  with pytest.raises(ValueError, match='not writable') as e:
    train.train_and_evaluate(config, str(blocker / 'run'))
  assert str(blocker) in str(e.value)


@pytest.mark.slow
def test_corrupt_latest_checkpoint_falls_back_and_still_ends_exactly(tmp_path, straight_run):
  """Bytes of step 12's largest data file flipped (same size): it fails its checksums, the run
  warns, resumes from step 8 and ends bit-identical to the straight run; nothing is deleted."""
  straight = straight_run[0]
  workdir = _copy_run(straight, tmp_path / 'run')
  files = [p for p in (workdir / 'checkpoints' / '12' / 'state').rglob('*') if p.is_file()]
  target = max(files, key=lambda p: p.stat().st_size)
  data = bytearray(target.read_bytes())
  for i in range(len(data) // 2, len(data) // 2 + 64):
    data[i] ^= 0xFF
  target.write_bytes(bytes(data))
  result = run_cli(workdir, '--config.total_steps=12', '--config.ckpt_every_steps=4')
  assert result.returncode == 0, result.stderr[-3000:]
  assert str(workdir / 'checkpoints' / '12') in result.stderr
  assert 'Resuming from the checkpoint of step 8' in result.stderr
  damaged = list((workdir / 'checkpoints').glob('12.damaged-*'))
  assert len(damaged) == 1 and (damaged[0] / 'state').is_dir()  # Moved aside, not deleted.
  assert ckpt_manager.Checkpointer(str(workdir)).all_steps() == [4, 8, 12]
  la = jax.tree.leaves(ckpt_reading.restore_subtree(str(straight), ()))
  lb = jax.tree.leaves(ckpt_reading.restore_subtree(str(workdir), ()))
  for x, y in zip(la, lb, strict=True):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.mark.slow
def test_stop_at_step_saves_there_and_a_later_start_ends_exactly(tmp_path, straight_run):
  """`stop_at_step=6` inside a 12-step schedule: the start logs and saves step 6 (not a multiple
  of ckpt_every_steps) and exits 0; a second call there says so; a start without it ends at 12
  bit-identical to the straight run (the schedules were laid over 12 steps throughout)."""
  workdir = tmp_path / 'run'
  result = run_cli(workdir, '--config.total_steps=12', '--config.ckpt_every_steps=4',
                   '--config.stop_at_step=6')
  assert result.returncode == 0, result.stderr[-3000:]
  assert ckpt_manager.Checkpointer(str(workdir)).all_steps() == [4, 6]
  assert max(read_metrics(workdir)) == 6
  again = run_cli(workdir, '--config.total_steps=12', '--config.ckpt_every_steps=4',
                  '--config.stop_at_step=6')
  assert again.returncode == 0 and 'already complete at step 6' in again.stderr, again.stderr[-2000:]
  result = run_cli(workdir, '--config.total_steps=12', '--config.ckpt_every_steps=4')
  assert result.returncode == 0, result.stderr[-3000:]
  assert 'Resuming from the checkpoint of step 6' in result.stderr
  assert sorted(read_metrics(workdir)) == list(range(2, 13, 2))
  la = jax.tree.leaves(ckpt_reading.restore_subtree(str(straight_run[0]), ()))
  lb = jax.tree.leaves(ckpt_reading.restore_subtree(str(workdir), ()))
  for x, y in zip(la, lb, strict=True):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


# One trainer per workdir, metrics that match the state, failures as one block, start-up errors
# (README, "Faults").

def _console_lines(result):
  """The whole console output of a CLI run (stdout and stderr), in non-empty lines."""
  return [l for l in (result.stdout + result.stderr).splitlines() if l.strip()]


def _not_info(stderr):
  """stderr without absl's INFO lines and TensorFlow's start-up notices."""
  return [l for l in stderr.splitlines() if l.strip() and not re.match(r'I\d{4} ', l)
          and 'oneDNN' not in l and 'InitializeLog' not in l]


# The first trainer of the double launch: it holds the lock and waits at step PAUSE_AT until the
# file GO exists, so that the second one surely starts while the first is running.
_PAUSE_HARNESS = textwrap.dedent('''
    import os, sys, time
    from cjepa_jax import preemption, train
    at, go = int(os.environ['PAUSE_AT']), os.environ['GO']
    original = preemption.Preemption.reached
    def reached(self, step):
      while step == at and not os.path.exists(go):
        time.sleep(0.1)
      return original(self, step)
    preemption.Preemption.reached = reached
    sys.argv = ['train'] + sys.argv[1:]
    train.run()
''')


@pytest.mark.slow
def test_second_trainer_on_a_workdir_fails_at_once_and_the_first_finishes(tmp_path):
  workdir, go = tmp_path / 'run', tmp_path / 'go'
  common = ('--config.total_steps=8', '--config.ckpt_every_steps=4')
  env = dict(os.environ, XLA_FLAGS=xla_flags(1),
             JAX_PLATFORMS='cpu', TF_CPP_MIN_LOG_LEVEL='3', PAUSE_AT='3', GO=str(go))
  first = subprocess.Popen([sys.executable, '-c', _PAUSE_HARNESS, *tiny_cli_args(workdir, *common)],
                           cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                           text=True)
  try:
    deadline = time.monotonic() + 300
    while not (workdir / 'metrics.jsonl').exists() and first.poll() is None:
      assert time.monotonic() < deadline, 'the first trainer never reached step 2'
      time.sleep(0.2)
    holder = json.loads((workdir / 'trainer.lock').read_text())
    assert holder['pid'] == first.pid
    started = time.monotonic()
    second = run_cli(workdir, *common)
    took = time.monotonic() - started
  finally:
    go.write_text('go')
    out, err = first.communicate(timeout=300)
  assert second.returncode == 1, second.stderr[-3000:]
  assert took < 10, f'the second trainer took {took:.1f} s to refuse'
  lines = _not_info(second.stderr)
  assert len(lines) == 1 and lines[0].startswith('cjepa-train: error: '), second.stderr
  for part in (f'{workdir} is in use by another trainer', f'pid {first.pid}', holder['host'],
               holder['started'], '--config.force_unlock=True'):
    assert part in lines[0], (part, lines[0])
  assert 'Traceback' not in second.stderr
  assert first.returncode == 0, err[-3000:]
  rows = [json.loads(l) for l in (workdir / 'metrics.jsonl').read_text().splitlines()]
  assert [r['step'] for r in rows] == [2, 4, 6, 8], 'one run, each step once'
  assert ckpt_manager.Checkpointer(str(workdir)).all_steps() == [4, 8]
  assert not (workdir / 'trainer.lock').exists(), 'released at the end'
  del out


_SIGKILL_AT_HARNESS = textwrap.dedent('''
    import os, signal, sys
    from cjepa_jax import preemption, train
    at = int(os.environ['KILL_AT'])
    original = preemption.Preemption.reached
    def reached(self, step):
      if step == at:
        os.kill(os.getpid(), signal.SIGKILL)
      return original(self, step)
    preemption.Preemption.reached = reached
    sys.argv = ['train'] + sys.argv[1:]
    train.run()
''')


def _event_steps(workdir, tag):
  """The steps of every `tag` scalar in the workdir's TensorBoard events files, in file order."""
  from tensorboardX.proto import event_pb2  # pylint: disable=g-import-not-at-top
  from cjepa_jax import metrics as metrics_lib  # pylint: disable=g-import-not-at-top
  steps = []
  for path in sorted(workdir.glob('events.out.tfevents.*')):
    for raw, _ in metrics_lib.read_event_records(str(path)):
      event = event_pb2.Event()
      event.ParseFromString(raw[12:-4])
      steps += [event.step for v in event.summary.value if v.tag == tag]
  return steps


@pytest.mark.slow
def test_killed_run_resumes_with_each_step_logged_once(tmp_path, straight_run):
  """SIGKILL after step 11 (checkpoints every 4, rows every 2), resume, finish: metrics.jsonl and
  TensorBoard hold each step once, equal to the uninterrupted run's (the issue's kill at 23 with
  checkpoints every 10, scaled down). The dead trainer's lock is taken over at once."""
  straight, _ = straight_run
  workdir = tmp_path / 'run'
  common = ('--config.total_steps=12', '--config.ckpt_every_steps=4')
  killed = run_python(['-c', _SIGKILL_AT_HARNESS, *tiny_cli_args(workdir, *common)], KILL_AT='11')
  assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
  assert json.loads((workdir / 'trainer.lock').read_text())['pid'] > 0, 'the dead one\'s lock'
  assert [json.loads(l)['step'] for l in (workdir / 'metrics.jsonl').read_text().splitlines()
          ] == [2, 4, 6, 8, 10]
  resumed = run_cli(workdir, *common)
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  assert 'Took over the lock' in resumed.stderr and 'is not running' in resumed.stderr
  assert not (workdir / 'trainer.lock').exists()
  rows = [json.loads(l) for l in (workdir / 'metrics.jsonl').read_text().splitlines()]
  assert [r['step'] for r in rows] == [2, 4, 6, 8, 10, 12], 'each step once, in order'
  a = read_metrics(straight)
  for row in rows:
    for key in ('loss', 'jepa', 'lr', 'weight_decay', 'ema_momentum', 'grad_norm', 'param_norm',
                'update_norm', 'target_feature_std', 'data_skipped', 'compiles'):
      assert row[key] == a[row['step']][key], (row['step'], key)
  resumed_from = ckpt_manager.Checkpointer(str(workdir)).all_steps()
  discarded = [json.loads(l) for l in (workdir / 'metrics.discarded.jsonl').read_text()
               .splitlines()]
  assert discarded and all(d['step'] > d['discarded_at_resume_from'] for d in discarded)
  assert resumed_from[-1] == 12
  # TensorBoard: one curve, each step once, over every events file of both starts.
  assert sorted(_event_steps(workdir, 'loss')) == [2, 4, 6, 8, 10, 12]
  assert len(list(workdir.glob('events.out.tfevents.*'))) == 2


# Disk full at the save of DISK_FULL_AT: from then on, no file of this process may grow past
# FSIZE bytes (EFBIG, as ENOSPC), the checkpoint's array data included.
_DISK_FULL_HARNESS = textwrap.dedent('''
    import os, resource, signal, sys
    from cjepa_jax import train
    from cjepa_jax.checkpoint import manager as ckpt_manager
    at = int(os.environ['DISK_FULL_AT'])
    original = ckpt_manager.Checkpointer.save
    def save(self, step, state, config=None, **kwargs):
      if step == at:
        self.wait()
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (int(os.environ['FSIZE']),
                                                   resource.RLIM_INFINITY))
      return original(self, step, state, config, **kwargs)
    ckpt_manager.Checkpointer.save = save
    sys.argv = ['train'] + sys.argv[1:]
    train.run()
''')


def test_disk_full_at_a_save_is_one_short_block(tmp_path):
  workdir = tmp_path / 'run'
  result = run_python(['-c', _DISK_FULL_HARNESS, *tiny_cli_args(
      workdir, '--config.total_steps=12', '--config.ckpt_every_steps=4')],
                      DISK_FULL_AT='8', FSIZE=str(1 << 20))
  assert result.returncode == 1, result.stderr[-3000:]
  lines = _console_lines(result)
  assert len(lines) <= 20, '\n'.join(lines)
  assert lines[-1].startswith(f'cjepa-train: error: Saving checkpoint {workdir}/checkpoints/8 '
                              'failed: '), lines[-1]
  assert 'File too large' in lines[-1] and 'last complete checkpoint (step 4)' in lines[-1]
  log = workdir / 'errors.log'
  assert f'(library tracebacks: {log})' in lines[-1]
  assert 'Traceback' in log.read_text() and 'Traceback' not in result.stderr
  assert ckpt_manager.Checkpointer(str(workdir)).all_steps() == [4]


@pytest.mark.slow
def test_damaged_checkpoint_is_one_short_block(tmp_path, straight_run):
  """Every data file of step 12 garbled: the read fails inside tensorstore (not only the
  checksums), which used to print hundreds of 'Event loop is closed' tracebacks."""
  workdir = _copy_run(straight_run[0], tmp_path / 'run')
  step_dir = workdir / 'checkpoints' / '12'
  for f in (step_dir / 'state').rglob('*'):
    if f.is_file() and f.parent.name == 'd':
      data = bytearray(f.read_bytes())
      data[len(data) // 2:] = bytes(255 - b for b in data[len(data) // 2:])
      f.write_bytes(bytes(data))
  result = run_cli(workdir, '--config.total_steps=12', '--config.ckpt_every_steps=4')
  assert result.returncode == 0, result.stderr[-3000:]
  lines = _console_lines(result)
  assert len(lines) <= 20, '\n'.join(lines)
  assert f'Not resuming from {step_dir}' in result.stderr
  assert 'Resuming from the checkpoint of step 8' in result.stderr
  assert 'Traceback' not in result.stderr
  if (workdir / 'errors.log').exists():   # Whether tensorstore left callbacks behind varies.
    assert f'go to {workdir / "errors.log"}' in result.stderr


def test_config_file_errors_are_one_line_and_leave_no_workdir(tmp_path):
  bad = tmp_path / 'bad_recipe.py'
  bad.write_text('def get_config(arg=None):\n  return {\n')
  cases = ((str(tmp_path / 'missing.py'), f'--config {tmp_path / "missing.py"}: no such file'),
           (str(tmp_path), f'--config {tmp_path} cannot be read: Is a directory'),
           (str(bad), f'--config {bad} is not valid Python: '),
           ('configs/cifar10_vit_tiny.py:nope', "takes one of ('ijepa', 'cjepa'"))
  for config, needle in cases:
    workdir = tmp_path / 'run'
    result = run_python(['-m', 'cjepa_jax.train', '--config', config, '--workdir', str(workdir)])
    assert result.returncode == 1, (config, result.stderr[-3000:])
    lines = _console_lines(result)
    assert len(lines) == 1 and lines[0].startswith('cjepa-train: error: '), result.stderr
    assert needle in lines[0], (needle, lines[0])
    assert not workdir.exists()
  assert 'at line 2' in run_python(['-m', 'cjepa_jax.train', '--config', str(bad), '--workdir',
                                    str(tmp_path / 'run')]).stderr


def test_label_checks_run_before_the_workdir_is_created(tmp_path):
  """The kNN monitor's classes differ between the splits: refused before anything is written."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  for split, names in (('train', ('apple', 'grass')), ('test', ('apple', 'snow'))):
    for name in names:
      (tmp_path / 'data' / split / name).mkdir(parents=True)
      Image.new('RGB', (8, 8), (90, 90, 90)).save(tmp_path / 'data' / split / name / '0.png')
  config = tiny_cli_config(**{'data.dataset': 'image_folder', 'data.num_classes': 2,
                              'data.data_dir': str(tmp_path / 'data'), 'data.eval_split': 'test',
                              'evals.knn.every_steps': 2})
  with pytest.raises(ValueError, match="has class 'grass' that"):
    train.train_and_evaluate(config, str(tmp_path / 'run'))
  assert not (tmp_path / 'run').exists()
  (tmp_path / 'old').mkdir()   # An existing workdir gets nothing either.
  with pytest.raises(ValueError, match="has class 'grass' that"):
    train.train_and_evaluate(config, str(tmp_path / 'old'))
  assert not list((tmp_path / 'old').iterdir())
