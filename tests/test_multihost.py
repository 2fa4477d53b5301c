"""The real trainer as a 2-process job on localhost: what a multi-host run needs (issue 7).

Two CPU processes with 2 fake devices each (a 4-device global mesh, gloo collectives) run
`python -m cjepa_jax.train ... --coordinator_address=127.0.0.1:PORT --num_processes=2
--process_id=I` on one shared workdir and a tiny image folder written here. The mesh is
`data=1, fsdp=4`, so the parameters are sharded across the two processes and the checkpoint is
written collectively. Checked:

  * both exit 0; only process 0 writes metrics.jsonl (one row per step), config.json, TensorBoard
    and the result line; the losses are finite and the step compiled once;
  * each process feeds the step exactly `make_train_iterator(process_index=i, process_count=2)`:
    the training images are uniform colours, one per file, so every image the trainer placed on
    the devices names its file; the two halves of each global batch are disjoint files of the
    right process;
  * the in-training kNN monitor counts every eval image once across the processes (the eval set
    is built so that the answer is exactly 0.5, and 0 or 1 if one process read the other's part);
  * the checkpoint written by 2 processes (parameters split between them) restores in one process:
    its parameter norm is the one the job logged, and the trainer's resume path (`restore_latest`
    onto a 1-device mesh) gives back every array of the state;
  * an error on one process stops both, each showing the message;
  * SIGTERM on one process: both save one agreed step, and the resumed job ends bit-identical.

The probe and fine-tuning as 2-process jobs: tests/test_multihost_evals.py.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import pathlib
import sys

import jax
import numpy as np
import pytest
from jax.sharding import Mesh

from cjepa_jax.checkpoint import layout as ckpt_layout
from cjepa_jax.checkpoint import manager as ckpt_manager
from cjepa_jax.checkpoint import reading as ckpt_reading
from cjepa_jax.data import input_pipeline
from cjepa_jax.data.spec import DataSpec
from cjepa_jax import optim
from cjepa_jax import sharding as sharding_lib
from cjepa_jax import train_step as step_lib
from cjepa_jax.models import jepa
from multiprocess_utils import (NUM_CLASSES, PER_CLASS, ROOT, SIZE, TIMEOUT_S, colour, cpu_env,
                                free_port, gloo_unavailable_reason, metric_rows, run_processes,
                                write_colour_folder)

pytestmark = [pytest.mark.slow,   # Multi-process jobs: the full suite only.
              pytest.mark.skipif(gloo_unavailable_reason() is not None,
                                 reason=f'no gloo CPU collectives: {gloo_unavailable_reason()}')]

# Overrides shared by every run here: a tiny model and the test's image folder (added per run).
# The tf.data loader, whose split of the files across processes is checked below (the grain
# loader's global shuffle across processes is tests/test_grain.py's).
TRAIN_ARGS = ('--config', 'configs/cifar10_vit_tiny.py', '--config.data.loader=tf',
              '--config.batch_size=16',
              '--config.model.depth=1', '--config.model.pred_depth=1',
              '--config.model.pred_width=48', '--config.log_every_steps=1',
              '--config.ckpt_every_steps=4', '--config.evals.knn.every_steps=4',
              '--config.evals.knn.k=1', '--config.evals.knn.train_examples=0',
              '--config.evals.knn.eval_examples=0')
JOB_ARGS = ('--config.total_steps=4', '--config.mesh.data=1', '--config.mesh.fsdp=4')

# Runs `python -m cjepa_jax.train` (runpy is what `-m` uses), recording the host-local arrays
# of the first two training batches as the trainer hands them to
# jax.make_array_from_process_local_data (inside input_pipeline.to_global_array).
_RECORDING_TRAINER = r'''
import os, runpy, sys
import jax
import numpy as np

_make = jax.make_array_from_process_local_data
_seen = {'image': [], 'label': []}

def _recording(sharding, local_data, global_shape=None):
  key = {4: 'image', 1: 'label'}.get(np.ndim(local_data))
  if key and len(_seen[key]) < 2:
    _seen[key].append(np.array(local_data))
    if all(len(v) == 2 for v in _seen.values()):
      np.savez(os.environ['RECORD_PREFIX'] + str(jax.process_index()) + '.npz',
               image=np.stack(_seen['image']), label=np.stack(_seen['label']))
  return _make(sharding, local_data, global_shape)

jax.make_array_from_process_local_data = _recording
runpy.run_module('cjepa_jax.train', run_name='__main__', alter_sys=True)
'''


def _config(data_dir: pathlib.Path):
  """The config the job's command line builds (recipe + TRAIN_ARGS + JOB_ARGS)."""
  spec = importlib.util.spec_from_file_location('recipe', ROOT / 'configs' / 'cifar10_vit_tiny.py')
  recipe = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(recipe)
  c = recipe.get_config()
  c.batch_size, c.total_steps, c.mesh.data, c.mesh.fsdp = 16, 4, 1, 4
  c.model.depth, c.model.pred_depth, c.model.pred_width = 1, 1, 48
  c.data.data_dir = str(data_dir)
  c.data.loader = 'tf'
  return c


def _train_command(workdir: pathlib.Path, data_dir: pathlib.Path, *extra: str) -> list[str]:
  return ['--workdir', str(workdir), *TRAIN_ARGS, f'--config.data.data_dir={data_dir}', *extra]


def _result_lines(stdout: str) -> list[dict]:
  """The trainer's JSON result line(s) (gloo also prints its connection lines to stdout)."""
  return [json.loads(line) for line in stdout.splitlines() if line.startswith('{')]


@dataclasses.dataclass
class Job:
  data_dir: pathlib.Path
  workdir: pathlib.Path
  record_prefix: str
  results: list
  elapsed: float
  rows: list[dict]          # metrics.jsonl right after the job (later tests resume it).
  listing: list[str]        # The workdir's entries right after the job.
  checkpoints: list[str]    # Its checkpoints/ entries.


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory) -> pathlib.Path:
  root = tmp_path_factory.mktemp('images')
  write_colour_folder(root)
  return root


@pytest.fixture(scope='module')
def job(tmp_path_factory, data_dir) -> Job:
  """The 2-process training job: 4 steps, a checkpoint at step 4, kNN monitor at step 4."""
  workdir = tmp_path_factory.mktemp('job') / 'run'
  record_prefix = str(tmp_path_factory.mktemp('record') / 'batches')
  address = f'127.0.0.1:{free_port()}'
  commands = [[sys.executable, '-c', _RECORDING_TRAINER,
               *_train_command(workdir, data_dir, *JOB_ARGS), f'--coordinator_address={address}',
               '--num_processes=2', f'--process_id={i}'] for i in range(2)]
  envs = [cpu_env(2, RECORD_PREFIX=record_prefix) for _ in range(2)]
  results, elapsed = run_processes(commands, envs, timeout=TIMEOUT_S)
  for i, r in enumerate(results):
    assert r.returncode == 0, f'process {i} (rc {r.returncode}):\n{r.stderr[-4000:]}'
  return Job(data_dir, workdir, record_prefix, results, elapsed, metric_rows(workdir),
             sorted(os.listdir(workdir)), sorted(os.listdir(workdir / 'checkpoints')))


def test_two_processes_train_as_one_job(job):
  for i, r in enumerate(job.results):
    assert f'[process {i}/2] ' in r.stderr
    assert f'JAX process {i} of 2; 2 local / 4 global devices (cpu)' in r.stderr
    assert "Mesh {'data': 1, 'fsdp': 4} over 4 devices (2 processes)" in r.stderr
  # Only process 0 writes: one metrics row per step, one config.json, one TensorBoard file, and
  # the result line on stdout (process 1 prints none).
  assert [r['step'] for r in job.rows] == [1, 2, 3, 4]
  events = [n for n in job.listing if n.startswith('events.out.tfevents.')]
  assert len(events) == 1, job.listing
  assert set(job.listing) == {'checkpoints', 'config.json', 'metrics.jsonl', *events}
  assert json.load(open(job.workdir / 'config.json', encoding='utf-8'))['total_steps'] == 4
  assert _result_lines(job.results[1].stdout) == []
  (result,) = _result_lines(job.results[0].stdout)
  assert result['step'] == 4 and result['loss'] == job.rows[-1]['loss']
  for row in job.rows:
    assert np.isfinite(row['loss']) and row['loss'] > 0
    assert np.isfinite(row['grad_norm']) and row['grad_norm'] > 0
    assert row['compiles'] == 1 and row['data_skipped'] == 0
  assert job.checkpoints == ['4']
  assert (job.workdir / 'checkpoints' / '4' / ckpt_layout.COMMIT_MARKER).exists()


def _file_of(image: np.ndarray, config) -> tuple[int, int]:
  """(class, k) of the uniform-colour training file a normalised [S, S, 3] crop came from."""
  pixels = (image * np.asarray(config.data.std) + np.asarray(config.data.mean)) * 255.0
  assert np.ptp(pixels, axis=(0, 1)).max() < 2.0, 'not a crop of a uniform image'
  mean = pixels.mean(axis=(0, 1))
  files = [(c, k) for c in range(NUM_CLASSES) for k in range(PER_CLASS)]
  dist = [np.abs(mean - colour(c, k)).max() for c, k in files]
  best = int(np.argmin(dist))
  assert dist[best] < 4.0, (mean, files[best])  # JPEG rounding; files are >= 24 levels apart.
  return files[best]


def test_each_process_feeds_its_own_disjoint_part(job):
  config = _config(job.data_dir)
  steps = {}  # step -> process -> [(class, k)] of the files in its half of the global batch
  for i in range(2):
    recorded = np.load(f'{job.record_prefix}{i}.npz')
    assert recorded['image'].shape == (2, 8, SIZE, SIZE, 3)  # 2 steps x local batch 16 / 2.
    # What the trainer fed is exactly this process's part of the pipeline.
    expected = input_pipeline.make_train_iterator(DataSpec.from_config(config), process_index=i,
                                                  process_count=2)
    for step in range(2):
      batch = next(expected)
      np.testing.assert_array_equal(recorded['image'][step], batch['image'])
      np.testing.assert_array_equal(recorded['label'][step], batch['label'])
      files = [_file_of(x, config) for x in recorded['image'][step]]
      assert [c for c, _ in files] == recorded['label'][step].tolist()
      # Sorted file index c * 8 + k goes to process (c * 8 + k) % 2 = k % 2.
      assert all(k % 2 == i for _, k in files), files
      steps.setdefault(step, {})[i] = files
  for step, halves in steps.items():
    assert len(set(halves[0]) | set(halves[1])) == 16, (step, halves)  # 16 different files.
  for i in range(2):  # Within an epoch (40 local files) no file repeats.
    assert len(set(steps[0][i]) | set(steps[1][i])) == 16


def test_knn_monitor_counts_each_eval_image_once(job):
  row = job.rows[-1]
  assert row['step'] == 4
  assert row['knn_top1'] == 50.0, row['knn_top1']  # In %; see write_colour_folder.
  assert row['unit'] == 'percent'


def test_checkpoint_of_two_processes_restores_in_one(job):
  config = _config(job.data_dir)
  step_dir = str(job.workdir / 'checkpoints' / '4')
  state = ckpt_reading.restore_subtree(step_dir, ())
  assert int(state['step']) == 4
  models = jepa.build_models(jepa.ModelSpec.from_config(config))
  tx = optim.make_optimizer(optim.AdamW.from_config(config), optim.make_schedules(
      optim.AdamW.from_config(config), optim.RunLength.from_config(config)))
  abstract = jax.eval_shape(lambda: step_lib.init_state(models, tx, config.seed))
  for key in ('params', 'target_params'):
    shapes = jax.tree.map(lambda x: x.shape, state[key])
    assert shapes == jax.tree.map(lambda x: x.shape, abstract[key]), key
  leaves = [np.asarray(x, np.float64) for x in jax.tree.leaves(state)]
  assert all(np.isfinite(x).all() for x in leaves)
  # The logged param_norm of step 4 is the norm after its update: the state that was saved, now
  # reassembled from the shards the two processes wrote (float64 reference).
  norm = np.sqrt(sum(np.sum(np.square(np.asarray(x, np.float64)))
                     for x in jax.tree.leaves(state['params'])))
  np.testing.assert_allclose(norm, job.rows[-1]['param_norm'], rtol=1e-5)


def test_two_process_checkpoint_resumes_on_one_device(job):
  """What the single-process trainer's resume does (`restore_latest` onto its own state
  shardings): the checkpoint's 4 FSDP shards, written by 2 processes, become one array each, equal
  to the partial restore above and restoring the step, the rng and the optimizer state too."""
  config = _config(job.data_dir)
  config.mesh.fsdp = 1
  mesh = Mesh(np.asarray(jax.devices()[:1]).reshape(1, 1), sharding_lib.MESH_AXES)
  run = step_lib.setup(step_lib.StepSpec.from_config(config), mesh)
  with ckpt_manager.Checkpointer(str(job.workdir)) as ckpt:
    step, state = ckpt.restore_latest(sharding_lib.with_shardings(run.abstract_state,
                                                                  run.state_shardings))
  assert step == 4 and int(state['step']) == 4
  whole = ckpt_reading.restore_subtree(str(job.workdir / 'checkpoints' / '4'), ())
  got = jax.tree.leaves(state)
  assert len(got) == len(jax.tree.leaves(whole))
  for x, y in zip(got, jax.tree.leaves(whole)):
    assert x.sharding.device_set == {jax.devices()[0]}
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_error_on_one_process_stops_both_with_its_message(tmp_path, data_dir):
  # The data exist on "host" 0 only: process 1 fails its start-up check, after jax.distributed
  # connected both; process 0 would wait for it in the first collective.
  missing = tmp_path / 'not_on_this_host'
  address = f'127.0.0.1:{free_port()}'
  commands = [[sys.executable, '-m', 'cjepa_jax.train',
               *_train_command(tmp_path / 'run', data_dir if i == 0 else missing, *JOB_ARGS),
               f'--coordinator_address={address}', '--num_processes=2', f'--process_id={i}']
              for i in range(2)]
  results, elapsed = run_processes(commands, [cpu_env(2), cpu_env(2)], timeout=TIMEOUT_S)
  assert elapsed < 90, f'the processes did not stop by themselves ({elapsed:.0f} s)'
  assert [r.returncode for r in results] == [1, 1]
  message = f'ValueError: Image folder split {missing}/train does not exist.'
  assert f'[process 1/2] {message}' in results[1].stderr, results[1].stderr[-3000:]
  assert '[process 0/2] ' in results[0].stderr
  assert f'stopping: process 1 failed: {message}' in results[0].stderr, results[0].stderr[-3000:]


# Process 1 gets a real SIGTERM at step 1; every process waits 1 s per step from then on so that
# JAX's preemption notifier (it polls once a second) reports it before the 4-step run ends.
_SIGTERM_TRAINER = r'''
import os, runpy, signal, sys, time
from cjepa_jax import preemption
original = preemption.Preemption.reached
def reached(self, step):
  if step == 1 and '--process_id=1' in sys.argv:
    os.kill(os.getpid(), signal.SIGTERM)
  time.sleep(1.0)
  return original(self, step)
preemption.Preemption.reached = reached
runpy.run_module('cjepa_jax.train', run_name='__main__', alter_sys=True)
'''


def test_sigterm_on_one_process_saves_one_agreed_step_and_resume_matches(tmp_path, job, data_dir):
  """SIGTERM to process 1: both processes save the same step, exit 75; the resumed job's step-4
  state is bit-identical to the uninterrupted job's."""
  workdir = tmp_path / 'run'

  def launch(*pre):
    address = f'127.0.0.1:{free_port()}'
    # No kNN monitor: it never changes the state compared below, and costs a compile per launch.
    commands = [[sys.executable, *pre, *_train_command(workdir, data_dir, *JOB_ARGS,
                                                       '--config.evals.knn.every_steps=0'),
                 f'--coordinator_address={address}', '--num_processes=2', f'--process_id={i}']
                for i in range(2)]
    results, _ = run_processes(commands, [cpu_env(2), cpu_env(2)], timeout=TIMEOUT_S)
    return results

  results = launch('-c', _SIGTERM_TRAINER)
  assert [r.returncode for r in results] == [75, 75], results[0].stderr[-3000:]
  steps = ckpt_manager.Checkpointer(str(workdir)).all_steps()
  assert len(steps) == 1 and 1 <= steps[0] < 4, steps
  saved = steps[0]
  for r in results:
    assert f'saved the checkpoint of step {saved}' in r.stderr, r.stderr[-3000:]
  assert 'SIGTERM received (process 1)' in results[1].stderr

  results = launch('-m', 'cjepa_jax.train')
  assert [r.returncode for r in results] == [0, 0], results[0].stderr[-3000:]
  assert f'Resuming from the checkpoint of step {saved}' in results[0].stderr
  ours = jax.tree.leaves(ckpt_reading.restore_subtree(str(workdir / 'checkpoints' / '4'), ()))
  theirs = jax.tree.leaves(ckpt_reading.restore_subtree(
      str(job.workdir / 'checkpoints' / '4'), ()))
  for x, y in zip(ours, theirs, strict=True):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
