r"""Pretrains a ViT with I-JEPA or C-JEPA on whatever devices are present.

  python -m cjepa_jax.train --config configs/cifar10_vit_tiny.py --workdir /tmp/run \
      [--config.total_steps=2000 --config.data.data_dir=... --config.mesh.fsdp=2 ...]

(also installed as `cjepa-train`). Restarting with the same `--workdir` resumes from the latest
complete checkpoint in `DIR/checkpoints/`: the step, the schedules, the EMA, the mask keys and the
data position all continue, so the run ends as if it had never stopped.

Writes `DIR/config.json`, `DIR/metrics.jsonl`, TensorBoard events in DIR and
`DIR/checkpoints/<step>/`, holding `DIR/trainer.lock` meanwhile (one trainer per workdir:
`workdir_lock.py`). A resumed run first drops what an interrupted one logged past its checkpoint
(`metrics.py`), so every step is logged once.

Faults (README, "Faults"): SIGTERM / SIGINT save the current step and exit with code 75
(`preemption.py`); a checkpoint directory that cannot be written stops the run before any compile,
a failed save within the step; a checkpoint that fails its checksums is reported and the newest
earlier one that verifies is used; resuming with a config that changes the state's shapes is
refused, one that changes the run's meaning needs `--config.allow_config_change=True`; a run that
is already complete says so and exits 0; a second trainer on a workdir fails at once naming the
first; every data and label check runs before the workdir is created.
"""

from __future__ import annotations

import os
import sys
from typing import Any

from absl import flags
from absl import logging
import jax
import jax.numpy as jnp
import ml_collections
from ml_collections import config_flags

from cjepa_jax.checkpoint import manager as ckpt_manager
from cjepa_jax.checkpoint import reading as ckpt_reading
from cjepa_jax import cli
from cjepa_jax import config as config_lib
from cjepa_jax import flops as flops_lib
from cjepa_jax import metrics as metrics_lib
from cjepa_jax import preemption
from cjepa_jax import sharding
from cjepa_jax import train_step as step_lib
from cjepa_jax import workdir as workdir_lib
from cjepa_jax.evals import registry as evals_registry

_FLAGS: dict[str, Any] = {}  # Defined by `run()`, not at import.

# Scalars logged as the log step's value; everything else in the step's metrics is averaged over
# the window. (`target_effective_rank` is computed by the trainer on log steps only.)
_LAST_VALUE = ('lr', 'weight_decay', 'ema_momentum')


def is_log_step(step: int, config: ml_collections.ConfigDict, total_steps: int) -> bool:
  """Whether the trainer logs after update number `step` (1 after the first update).

  Every `log_every_steps`, every in-training evaluation (kNN, few-shot) and the last step.
  """
  log = step % config.log_every_steps == 0 or step == total_steps
  periods = evals_registry.in_training_periods(config).values()
  return bool(log or any(step % every == 0 for every in periods))


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Runs (or resumes) pretraining; returns the last logged metrics.

  Returns `{'step': N, 'already_complete': True}` without training when the workdir's latest
  checkpoint is the run's last step.

  Raises:
    ValueError (config, data, checkpoint problems), workdir.NonFiniteError, workdir.Preempted
    (SIGTERM / SIGINT: the current step was saved).
  """
  config_lib.validate(config)
  created = not os.path.exists(workdir)
  try:
    return _train(config, workdir)
  except BaseException:
    if created and jax.process_index() == 0:
      workdir_lib.remove_if_empty(workdir)   # A failed first start leaves no empty workdir behind.
    raise


def _train(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  from cjepa_jax.data import input_pipeline  # pylint: disable=g-import-not-at-top  (TF: host only)

  mesh = sharding.make_mesh(config)
  run = step_lib.setup(config, mesh)   # Builds and checks the models; compiles nothing.
  input_pipeline.check_dataset(config)  # Fails fast, naming how to prepare the data.
  # Evaluators run during pretraining (kNN, few-shot monitors), each with its period in steps.
  # Made now: they check their splits' labels before anything is written.
  in_training = evals_registry.in_training(config, mesh, run.models.encoder)
  # Nothing is written in the workdir before its lock is held (process 0 holds it for the job).
  with workdir_lib.locked(workdir, force=config.force_unlock) as lock:
    # Opens (creating) WORKDIR/checkpoints and checks that it is writable, before any compile.
    ckpt = ckpt_manager.Checkpointer(
        workdir, keep=config.keep_ckpts, keep_every_steps=config.keep_every_steps,
        save_every_steps=config.ckpt_every_steps)
    try:
      return _loop(config, workdir, mesh, run, ckpt, input_pipeline, in_training, lock)
    finally:
      ckpt.close()


def _loop(config, workdir, mesh, run, ckpt, input_pipeline, in_training, lock
          ) -> dict[str, Any]:
  """Restore or initialise, then train; `ckpt` is closed (and `lock` released) by the caller."""
  is_main = jax.process_index() == 0
  models, total_steps, steps_per_epoch = run.models, run.total_steps, run.steps_per_epoch
  ckpt.report_incomplete()   # Cut-off saves: reported (and moved aside) before any training.
  latest = ckpt.latest_step()
  extra: dict[str, Any] = {}
  if latest is not None:
    workdir_lib.check_resume_config(ckpt.restore_config(latest), config,
                        str(ckpt.directory / str(latest)))
    start_step, state = ckpt.restore_latest(
        workdir_lib.with_shardings(run.abstract_state, run.state_shardings))
    logging.info('Resuming from the checkpoint of step %d in %s.', start_step, workdir)
    extra = ckpt.restore_extra(start_step)
    last_good: int | None = start_step
  else:
    state = run.init_fn()
    if config.init_from:
      state = ckpt_reading.load_init_from(config.init_from, state, run.state_shardings)
    last_good = None
  start_step = int(jax.device_get(state['step']))
  if start_step >= total_steps:
    logging.info('Already complete at step %d (of %d) in %s: nothing to do.', start_step,
                 total_steps, workdir)
    return {'step': start_step, 'already_complete': True}
  logging.info('Mesh %s over %d devices (%d processes); %d steps of batch %d (%d per epoch).',
               dict(mesh.shape), jax.device_count(), jax.process_count(), total_steps,
               config.batch_size, steps_per_epoch)

  # Rows and events an interrupted start logged past `start_step` go first: each step once.
  writer = metrics_lib.MetricWriter(workdir, enabled=is_main, start_step=start_step)
  batch_sharding = sharding.batch_sharding(mesh)
  data = input_pipeline.make_train_iterator(config, start_step=start_step)
  flops_per_step = flops_lib.step_flops(models.step_shape()) * config.batch_size
  peak = flops_lib.peak_tflops(override=config.peak_tflops) * 1e12 * jax.device_count()

  log = metrics_lib.LogWindow(config.batch_size, total_steps, steps_per_epoch, flops_per_step,
                              peak, writer, last_value_keys=_LAST_VALUE)
  rank_fn = jax.jit(lambda x: step_lib.effective_rank(x - jnp.mean(x, axis=0)))
  pending: tuple[int, jax.Array] | None = None   # (step, finite flag), checked one step late.
  # Images the input pipeline skipped as unreadable, over the whole run (kept in checkpoints).
  skipped_before = int(extra.get('data_skipped', 0))
  data_skipped = skipped_before
  try:
    with preemption.Preemption() as preempt:
      for step in range(start_step + 1, total_steps + 1):
        host_batch = next(data)
        if 'data_skipped' in host_batch:
          data_skipped = skipped_before + int(host_batch.pop('data_skipped'))
        batch = input_pipeline.to_global_array(host_batch, batch_sharding)
        state, step_metrics, pooled = run.jitted_step(state, batch)
        if step == start_step + 1 and is_main:
          # Compiled and running: this start is good.
          workdir_lib.save_config(config, workdir, start_step)
        ckpt.check()   # A background save that failed stops the run here, with its cause.
        lock.check()   # Another trainer forced the lock over: stop before writing again.
        # Check the previous step's flag now, while the device is already busy with this step.
        if pending is not None:
          workdir_lib.check_finite(*pending, last_good, workdir)
        pending = (step, step_metrics['finite'])
        log.add(step, step_metrics)

        evals_now = [ev for _, every, ev in in_training
                     if step % every == 0 or step == total_steps]
        log_now = is_log_step(step, config, total_steps)
        save_now = step % config.ckpt_every_steps == 0 or step == total_steps
        preempted = preempt.reached(step)
        if log_now or save_now or preempted:
          # Never log or save a non-finite state.
          workdir_lib.check_finite(*pending, last_good, workdir)
          pending = None
        if log_now:
          def diagnostics(evals_now=evals_now, pooled=pooled,
                          target=step_lib.target_encoder_params(state)):
            # RankMe of this step's pooled target features: an SVD of [B, D], on log steps only.
            out = {'target_effective_rank': float(rank_fn(pooled))}
            for evaluator in evals_now:
              out.update(evaluator.evaluate(target))
            return out
          log.flush(step, diagnostics, compiles=run.trace_count[0], data_skipped=data_skipped)
        if save_now or preempted:
          saved = ckpt.save(step, state, config, force=step == total_steps or preempted,
                            extra={'data_skipped': data_skipped})
          last_good = step
        if preempted:
          ckpt.wait()   # The save must be durable before the process goes.
          preempt.log_stop(step, saved, str(ckpt.directory))
          raise workdir_lib.Preempted(step)
    ckpt.wait()
  finally:
    writer.close()
  if run.trace_count[0] != 1:
    logging.warning('The train step compiled %d times; expected once.', run.trace_count[0])
  return log.last


def main(argv: list[str]) -> None:
  cli.trainer_main(
      argv, _FLAGS['config'].value, _FLAGS['workdir'].value, train_and_evaluate,
      example='--config configs/cifar10_vit_tiny.py --workdir /tmp/cjepa_run',
      complete_hint=' (to train further, raise --config.total_steps or --config.epochs and add '
                    '--config.allow_config_change=True)')


def run() -> None:
  """Console-script entry point (`cjepa-train`): flags, jax.distributed start-up, then `main`."""
  _FLAGS['config'] = config_flags.DEFINE_config_file(
      'config', None, 'Recipe file (configs/*.py[:arg]).', lock_config=True)
  _FLAGS['workdir'] = flags.DEFINE_string('workdir', None,
                                          'Where checkpoints, metrics and logs go.')
  cli.run('cjepa-train', main, doc=__doc__, module=sys.argv[0] if __name__ == '__main__'
          else __name__, extra_help=config_lib.help_text)


if __name__ == '__main__':
  run()
