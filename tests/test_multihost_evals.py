"""The probe and fine-tuning as 2-process jobs on localhost: what a multi-host evaluation needs.

Two CPU processes with 2 fake devices each (a 4-device global mesh, gloo collectives) run
`python -m cjepa_jax.probe` / `python -m cjepa_jax.finetune ... --num_processes=2` on a tiny
image folder and a pretraining checkpoint written here, and must give what one process gives:

  * the probe: every evaluator's accuracies (linear, kNN, few-shot, low-shot, attentive), only
    process 0 writing the results;
  * fine-tuning (mesh data 1 x fsdp 4: the parameters split between the processes): the metrics
    of process 0 alone, the checkpoints written collectively, and an evaluation that counts each
    test image once.

Apart from tests/test_multihost.py (the trainer's 2-process job) so that the two files' jobs run
on different workers under `pytest -n 2 --dist loadfile` (README): the checkpoint here is written
without training, as tests/test_probe.py's is.
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys

import jax
import numpy as np
import pytest

from cjepa_jax.checkpoint import manager as ckpt_manager
from cjepa_jax.checkpoint import reading as ckpt_reading
from cjepa_jax import sharding as sharding_lib
from cjepa_jax.data.spec import DataSpec
from cjepa_jax.evals import base
from cjepa_jax.evals import registry
from cjepa_jax.models import jepa
from multiprocess_utils import (ROOT, TIMEOUT_S, cpu_env, free_port, gloo_unavailable_reason,
                                metric_rows, run_processes, write_colour_folder)
import pretrained_utils

pytestmark = [pytest.mark.slow,   # Multi-process jobs: the full suite only.
              pytest.mark.skipif(gloo_unavailable_reason() is not None,
                                 reason=f'no gloo CPU collectives: {gloo_unavailable_reason()}')]


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory):
  root = tmp_path_factory.mktemp('images')
  write_colour_folder(root)
  return root


@pytest.fixture(scope='module')
def pretrained(tmp_path_factory):
  """A workdir with the CIFAR recipe's checkpoint (1-block encoder), context != EMA target."""
  spec = importlib.util.spec_from_file_location('recipe', ROOT / 'configs' / 'cifar10_vit_tiny.py')
  recipe = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(recipe)
  c = recipe.get_config()
  c.batch_size, c.total_steps = 16, 4
  c.model.depth, c.model.pred_depth, c.model.pred_width = 1, 1, 48
  workdir = tmp_path_factory.mktemp('pretrained')

  def move(state):
    state['target_params'] = jax.tree.map(lambda x: x * 0.9, state['target_params'])
    return state

  pretrained_utils.save_pretraining_checkpoint(workdir, c, 4, move)
  return workdir


# The probe config of the 2-process probe below: every evaluator, sized for 80 tiny images.
PROBE_OVERRIDES = {
    # One feature kind and one grid point each: no choice on 8 held-out images for float
    # rounding to flip (the choices themselves are tested in test_probe.py / test_evals.py).
    'probes': 'linear,knn,fewshot,lowshot,attentive', 'features': 'last', 'batch_size': 16,
    **{f'evals.{name}.{k}': v for name in ('linear', 'lowshot')
       for k, v in (('batch_size', 16), ('lrs', (0.1,)), ('wds', (0.0,)), ('epochs', 3))},
    'evals.knn.k': 3,
    'evals.fewshot.shots': (1, 2), 'evals.fewshot.seeds': 2, 'evals.lowshot.fractions': (0.25,),
    'evals.attentive.epochs': 1, 'evals.attentive.batch_size': 16,
    'evals.attentive.lrs': (0.001,), 'evals.attentive.wds': (0.01,)}


def _flag(key, value):
  text = f'({",".join(map(str, value))},)' if isinstance(value, tuple) else str(value)
  return f'--config.{key}={text}'


def _probe_config(pretrained, data_dir):
  """The config PROBE_OVERRIDES gives on the command line, built in this process."""
  spec = importlib.util.spec_from_file_location('probe', ROOT / 'configs' / 'probe_linear.py')
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  c = module.get_config()
  c.pretrained, c.data.data_dir = str(pretrained), str(data_dir)
  c.update_from_flattened_dict(PROBE_OVERRIDES)  # Dotted keys, e.g. 'model.depth'.
  return c


def _compare_accuracies(a, b, tolerance, path=''):
  """Asserts every top-k accuracy of probe results `a` is within `tolerance` of `b`'s; returns
  the paths compared."""
  if isinstance(a, dict):
    return [p for k in a if k not in ('config', 'checkpoint')
            for p in _compare_accuracies(a[k], b[k], tolerance, f'{path}/{k}'.lstrip('/'))]
  if isinstance(a, float) and 'top' in path:
    assert abs(a - b) <= tolerance, (path, a, b)
    return [path]
  return []


def test_two_processes_probe_the_checkpoint_as_one_process_does(tmp_path, pretrained,
                                                                  data_dir):
  """`cjepa-probe` with every evaluator as a 2-process job (4 devices): only process 0 writes and
  prints, and every evaluator gives what the single-process probe (in this process) gives.

  Each process reads every other file; the gathered features are put back in the split's order
  (`pos`), so the seeded holdout rows, minibatches and k-shot draws pick the same examples. What
  may differ is float rounding of sums split over 4 rather than 8 devices, so accuracies are
  compared to within one of the 20 test images.
  """
  out = tmp_path / 'probe'
  address = f'127.0.0.1:{free_port()}'
  common = ['--config', 'configs/probe_linear.py', f'--config.pretrained={pretrained}',
            f'--config.data.data_dir={data_dir}',
            *(_flag(k, v) for k, v in PROBE_OVERRIDES.items())]
  commands = [[sys.executable, '-m', 'cjepa_jax.probe', *common, f'--workdir={out}',
               f'--coordinator_address={address}', '--num_processes=2', f'--process_id={i}']
              for i in range(2)]
  results, _ = run_processes(commands, [cpu_env(2), cpu_env(2)], timeout=TIMEOUT_S)
  assert [r.returncode for r in results] == [0, 0], results[0].stderr[-3000:]
  assert 'attentive' in results[0].stdout and 'attentive' not in results[1].stdout
  assert os.listdir(out) == ['probe_results.json']
  two = json.loads((out / 'probe_results.json').read_text())

  from cjepa_jax.evals import runner  # pylint: disable=g-import-not-at-top
  one = runner.run(_probe_config(pretrained, data_dir), str(tmp_path / 'one'))
  assert two['num_train'] == one['num_train'] == 80 and two['num_test'] == one['num_test'] == 20
  assert two['knn'] == one['knn']
  assert two['complete'] and set(two['evals']) == set(one['evals'])
  assert set(two['fewshot']['top1']) == {'1', '2'}
  # As written to JSON (integer keys such as the shot counts become strings).
  compared = _compare_accuracies(two, json.loads(json.dumps(one)), tolerance=100 / 20 + 1e-9)
  assert {p.split('/')[0] for p in compared} == {'linear', 'knn', 'fewshot', 'lowshot',
                                                  'attentive'}
  assert two['lowshot']['fractions']['25%']['num_train'] == 20  # 2 of 8 per class, 10 classes.
  for name in ('linear', 'attentive'):
    assert 0.0 <= two[name]['top1'] <= 100.0 and np.isfinite(two[name]['holdout_loss'])
  assert two['unit'] == one['unit'] == 'percent'


def test_two_processes_finetune_as_one_job(tmp_path, pretrained, data_dir):
  """`cjepa-finetune` from the checkpoint as a 2-process job (mesh data 1 x fsdp 4: the
  parameters split between the processes): both exit 0, only process 0 writes metrics, the last
  and best checkpoints are written collectively, and the evaluation counts each of the 20 test
  images once: its top-1 and loss equal those of the saved last state evaluated in this process
  on one device (to within one image and float rounding).
  """
  from cjepa_jax import finetune  # pylint: disable=g-import-not-at-top
  from cjepa_jax import finetune_step  # pylint: disable=g-import-not-at-top
  import ml_collections  # pylint: disable=g-import-not-at-top

  workdir = tmp_path / 'ft'
  address = f'127.0.0.1:{free_port()}'
  common = ['--config', 'configs/finetune_cifar10.py', f'--config.pretrained={pretrained}',
            f'--config.data.data_dir={data_dir}', '--config.batch_size=16',
            '--config.total_steps=2', '--config.log_every_steps=1', '--config.evals.classify.every_steps=1',
            '--config.ckpt_every_steps=2', '--config.evals.classify.eval_batch_size=8',
            '--config.optim.warmup_steps=1', '--config.mesh.data=1', '--config.mesh.fsdp=4']
  commands = [[sys.executable, '-m', 'cjepa_jax.finetune', *common, f'--workdir={workdir}',
               f'--coordinator_address={address}', '--num_processes=2', f'--process_id={i}']
              for i in range(2)]
  results, _ = run_processes(commands, [cpu_env(2), cpu_env(2)], timeout=TIMEOUT_S)
  assert [r.returncode for r in results] == [0, 0], results[0].stderr[-3000:]
  assert "Mesh {'data': 1, 'fsdp': 4} over 4 devices (2 processes)" in results[0].stderr
  rows = metric_rows(workdir)
  assert [r['step'] for r in rows] == [1, 2]   # Process 0 alone writes: one row per step.
  assert all(r['eval_examples'] == 20 for r in rows), rows
  assert ckpt_manager.Checkpointer(str(workdir)).all_steps() == [2]
  assert ckpt_manager.Checkpointer(str(workdir / finetune.BEST_DIR)).latest_step() in (1, 2)

  saved = ckpt_reading.load_config(str(workdir))
  encoder = jepa.encoder_from_model_config(saved['model'])
  config = ml_collections.ConfigDict({k: v for k, v in saved.items() if k != 'finetune_source'})
  config.mesh.data, config.mesh.fsdp = 1, 1
  mesh = sharding_lib.make_mesh(sharding_lib.MeshSpec.from_config(config), jax.devices()[:1])
  run = finetune_step.setup(finetune_step.StepSpec.from_config(config), mesh, encoder)
  ckpt = ckpt_manager.Checkpointer(str(workdir))
  try:
    _, state = ckpt.restore_latest(
        sharding_lib.with_shardings(run.abstract_state, run.state_shardings))
  finally:
    ckpt.close()
  one = registry.build('classify', base.EvalsSpec.from_config(config), DataSpec.from_config(config),
                       mesh, run.model).evaluate(state['params'])
  assert one['eval_examples'] == 20
  assert abs(one['eval_top1'] - rows[-1]['eval_top1']) <= 100 / 20 + 1e-9
  np.testing.assert_allclose(one['eval_loss'], rows[-1]['eval_loss'], rtol=1e-4)
