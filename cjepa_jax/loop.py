"""The training loop that pretraining (train.py) and fine-tuning (finetune.py) both run.

  run(task, workdir)             the whole run: the workdir's lock, restore or init, the steps,
                                 evaluations, saves; returns the last logged metrics.
  Task                           what a kind of training gives the loop (its setup, fresh state,
                                 data, evaluators, metrics to log).
  RunSpec.from_config(config)    what the loop reads of a config (cadences, keeping, the start's
                                 switches, the config's record), read where the config enters.

What it does once for both:
  * nothing is written before every check has passed (the entry point's task is built, which
    checks the models, the data and the evaluators) and the workdir's lock is held (one trainer
    per workdir, `workdir_lock.py`); a failed first start leaves no empty workdir behind;
  * restore the latest complete checkpoint (refusing a config that changes the state's shapes, or
    without `allow_config_change` its meaning) or start a fresh state; a run whose latest
    checkpoint is its last step says so and returns `{'step', 'already_complete': True}`;
  * the metrics window (`metrics.LogWindow`: metrics.jsonl, TensorBoard, the progress line), rows
    an interrupted start logged past its checkpoint dropped first;
  * the finite check one step late (the device runs the next step meanwhile), at once on steps
    that log or save: a NaN / inf stops the run (`metrics.NonFiniteError`) naming the last good
    save;
  * evaluators at their cadence (`every_steps`, and at the last step), on log steps; a task's
    `keep_best` evaluator result keeps its best checkpoint in DIR/best (fine-tuning's best model);
  * periodic, final and preemption saves (SIGTERM / SIGINT: save this step, raise
    `preemption.Preempted`, which the CLIs turn into exit code 75);
  * config.json once the first step ran (`config.save_json`), and a warning when the step
    compiled more than once.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from typing import Any, Callable, Iterator, Sequence

from absl import logging
import jax
import ml_collections

from cjepa_jax.checkpoint import manager as ckpt_manager
from cjepa_jax import config as config_lib
from cjepa_jax import flops as flops_lib
from cjepa_jax import metrics as metrics_lib
from cjepa_jax import preemption
from cjepa_jax import sharding
from cjepa_jax import workdir_lock
from cjepa_jax.data.spec import DataSpec
from cjepa_jax.evals import registry as evals_registry

State = dict[str, Any]
BEST_DIR = 'best'   # DIR/best/checkpoints/<step>: the checkpoint of a task's best evaluation.


@dataclasses.dataclass(frozen=True)
class RunSpec:
  """What the loop reads of a run's config (config.py says what each key is)."""
  batch_size: int
  stop_at_step: int             # > 0: this start stops (saved) there.
  log_every_steps: int
  ckpt_every_steps: int
  keep_ckpts: int
  keep_every_steps: int
  peak_tflops: float
  force_unlock: bool
  allow_config_change: bool
  config_json: str              # DIR/config.json's text: the config this start runs.
  settings: dict[str, Any]      # That config as a dict: compared with a checkpoint's on resume.

  @classmethod
  def from_config(cls, config: ml_collections.ConfigDict) -> RunSpec:
    """Reads `config`'s cadences, keeping and switches, and records the config itself."""
    return cls(
        batch_size=config.batch_size, stop_at_step=int(config.get('stop_at_step', 0) or 0),
        log_every_steps=config.log_every_steps, ckpt_every_steps=config.ckpt_every_steps,
        keep_ckpts=config.keep_ckpts, keep_every_steps=config.keep_every_steps,
        peak_tflops=config.peak_tflops, force_unlock=config.force_unlock,
        allow_config_change=config.allow_config_change,
        config_json=config.to_json_best_effort(indent=2, sort_keys=True),
        settings=config.to_dict())


@dataclasses.dataclass(frozen=True)
class Task:
  """What one kind of training gives the loop; made by the entry point after its checks.

  `setup` is the step's `Setup` (train_step.py / finetune_step.py): the state's abstract shape
  and shardings, the jitted step `(state, batch) -> (state, metrics, *aux)`, its trace count and
  the run's length.
  """
  run: RunSpec                        # Cadences, keeping, the config it runs (DIR/config.json).
  mesh: jax.sharding.Mesh
  setup: Any
  init_state: Callable[[], State]     # A fresh, sharded state (step 0).
  saved_config: dict[str, Any]        # Saved with every checkpoint.
  data: DataSpec                      # The training input.
  evaluators: Sequence[evals_registry.Monitor]   # Run on log steps at their cadence.
  eval_params: Callable[[State], Any]  # What the evaluators evaluate: the encoder, the classifier.
  flops_per_step: float               # Of the whole batch (MFU).
  last_value_keys: tuple[str, ...]    # Logged as the log step's value, not the window's mean.
  lr_key: str                         # The lr's config key, named by a non-finite stop.
  state_signature: Callable[[dict[str, Any]], dict[str, Any]] | None = None  # resume_changes'.
  # (state, aux outputs of the step) -> values logged on log steps beside the evaluators'.
  diagnostics: Callable[[State, tuple[Any, ...]], dict[str, float]] | None = None
  keep_best: str | None = None        # An evaluator result: its best step's checkpoint is kept.
  describe: str = ''                  # Appended to the start-up line (e.g. the peak lr).


def run(task: Task, workdir: str) -> dict[str, Any]:
  """Runs (or resumes) `task` in `workdir`; returns the last logged metrics, or
  `{'step': N, 'already_complete': True}` when the latest checkpoint is the last step.

  The task was built (and so its models, data and evaluators checked) before this creates or
  writes anything in `workdir`.

  Raises:
    ValueError (config, data, checkpoint problems), metrics.NonFiniteError, preemption.Preempted
    (SIGTERM / SIGINT: the current step was saved).
  """
  created = not os.path.exists(workdir)
  spec = task.run
  try:
    # Nothing is written in the workdir before its lock is held (process 0 holds it for the job).
    with locked(workdir, force=spec.force_unlock) as lock:
      # Opens (creating) WORKDIR/checkpoints and checks that it is writable, before any compile.
      ckpt = ckpt_manager.Checkpointer(
          workdir, keep=spec.keep_ckpts, keep_every_steps=spec.keep_every_steps,
          save_every_steps=spec.ckpt_every_steps)
      best = (ckpt_manager.Checkpointer(os.path.join(workdir, BEST_DIR), keep=1)
              if task.keep_best else None)
      try:
        return _loop(task, workdir, ckpt, best, lock)
      finally:
        if best is not None:
          best.close()
        ckpt.close()
  except BaseException:
    if created and jax.process_index() == 0:
      workdir_lock.remove_if_empty(workdir)   # A failed first start leaves no empty workdir.
    raise


def _restore_or_init(task: Task, ckpt: ckpt_manager.Checkpointer, workdir: str
                     ) -> tuple[State, dict[str, Any], int | None]:
  """(state, the checkpoint's extra values, the last good step: None for a fresh state)."""
  latest = ckpt.latest_step()
  if latest is None:
    return task.init_state(), {}, None
  check_resume_config(ckpt.restore_config(latest), task.run,
                      str(ckpt.directory / str(latest)), task.state_signature)
  start_step, state = ckpt.restore_latest(
      sharding.with_shardings(task.setup.abstract_state, task.setup.state_shardings))
  logging.info('Resuming from the checkpoint of step %d in %s.', start_step, workdir)
  return state, ckpt.restore_extra(start_step), start_step


def _loop(task: Task, workdir: str, ckpt: ckpt_manager.Checkpointer,
          best_ckpt: ckpt_manager.Checkpointer | None, lock: workdir_lock.WorkdirLock
          ) -> dict[str, Any]:
  """Restore or initialise, then train; the checkpointers are closed (and `lock` released) by the
  caller."""
  from cjepa_jax.data import input_pipeline  # pylint: disable=g-import-not-at-top  (TF: host only)

  spec, run = task.run, task.setup
  is_main = jax.process_index() == 0
  total_steps = run.total_steps
  managers = [c for c in (ckpt, best_ckpt) if c is not None]
  for c in managers:
    c.report_incomplete()   # Cut-off saves: reported (and moved aside) before any training.
  state, extra, last_good = _restore_or_init(task, ckpt, workdir)
  start_step = int(jax.device_get(state['step']))
  # `stop_at_step` ends this start early, inside the schedules of the whole run (which stay laid
  # over `total_steps`): a budget cut for tuning that a later start resumes exactly.
  stop = spec.stop_at_step
  end = min(stop, total_steps) if stop > 0 else total_steps
  if start_step >= end:
    logging.info('Already complete at step %d (of %d%s) in %s: nothing to do.', start_step,
                 total_steps, f', stop_at_step {stop}' if end < total_steps else '', workdir)
    return {'step': start_step, 'already_complete': True}
  logging.info('Mesh %s over %d devices (%d processes); %d steps of batch %d (%d per epoch)%s.',
               dict(task.mesh.shape),
               jax.device_count(), jax.process_count(), total_steps, spec.batch_size,
               run.steps_per_epoch, task.describe)
  best = metrics_lib.BestResult(task.keep_best, extra)

  # Rows and events an interrupted start logged past `start_step` go first: each step once.
  writer = metrics_lib.MetricWriter(workdir, enabled=is_main, start_step=start_step)
  batch_sharding = sharding.batch_sharding(task.mesh)
  data = input_pipeline.make_train_iterator(task.data, start_step=start_step)
  peak = flops_lib.peak_tflops(override=spec.peak_tflops) * 1e12 * jax.device_count()
  log = metrics_lib.LogWindow(spec.batch_size, total_steps, run.steps_per_epoch,
                              task.flops_per_step, peak, writer,
                              last_value_keys=task.last_value_keys)
  pending: tuple[int, jax.Array] | None = None   # (step, finite flag), checked one step late.
  periods = tuple(m.every_steps for m in task.evaluators)
  # Images the input pipeline skipped as unreadable, over the whole run (kept in checkpoints).
  skipped_before = int(extra.get('data_skipped', 0))
  data_skipped = skipped_before
  try:
    with preemption.Preemption() as preempt:
      for step in range(start_step + 1, end + 1):
        host_batch = next(data)
        if 'data_skipped' in host_batch:
          data_skipped = skipped_before + int(host_batch.pop('data_skipped'))
        batch = input_pipeline.to_global_array(host_batch, batch_sharding)
        state, step_metrics, *aux = run.jitted_step(state, batch)
        if step == start_step + 1 and is_main:
          # Compiled and running: this start is good.
          config_lib.save_json(spec.config_json, workdir, start_step)
        for c in managers:
          c.check()   # A background save that failed stops the run here, with its cause.
        lock.check()   # Another trainer forced the lock over: stop before writing again.
        # Check the previous step's flag now, while the device is already busy with this step.
        if pending is not None:
          metrics_lib.check_finite(*pending, last_good, workdir, task.lr_key)
        pending = (step, step_metrics['finite'])
        log.add(step, step_metrics)

        evals_now = [m for m in task.evaluators if step % m.every_steps == 0 or step == end]
        log_now = metrics_lib.is_log_step(step, spec.log_every_steps, periods, end)
        save_now = step % spec.ckpt_every_steps == 0 or step == end
        preempted = preempt.reached(step)
        if log_now or save_now or preempted:
          # Never log or save NaNs.
          metrics_lib.check_finite(*pending, last_good, workdir, task.lr_key)
          pending = None
        best.improved = False
        if log_now:
          def diagnostics(step=step, evals_now=evals_now, state=state, aux=tuple(aux)):
            out = dict(task.diagnostics(state, aux)) if task.diagnostics else {}
            params = task.eval_params(state)
            for monitor in evals_now:
              out.update(best.observe(step, monitor.evaluate(params)))
            return out
          log.flush(step, diagnostics, compiles=run.trace_count[0], data_skipped=data_skipped)
        extra = dict(best.extra(), data_skipped=data_skipped)
        # The two managers never write at once: concurrent async saves of two orbax managers share
        # multi-process barrier names ('... set_value_start is already ongoing' on 2 processes).
        if best.improved:
          ckpt.wait()
          best_ckpt.save(step, state, task.saved_config, force=True, extra=extra)
        if save_now or preempted:
          if best_ckpt is not None:
            best_ckpt.wait()
          saved = ckpt.save(step, state, task.saved_config,
                            force=step == end or preempted, extra=extra)
          last_good = step
        if preempted:
          for c in managers:
            c.wait()   # The saves must be durable before the process goes.
          preempt.log_stop(step, saved, str(ckpt.directory))
          raise preemption.Preempted(step)
    for c in managers:
      c.wait()
  finally:
    writer.close()
  if run.trace_count[0] != 1:
    logging.warning('The train step compiled %d times; expected once.', run.trace_count[0])
  return log.last


# ------------------------------------------------------------------------------------------------
# The workdir around the checkpoints: its lock, and a checkpoint's saved config against this
# start's.
# ------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def locked(workdir: str, force: bool = False) -> Iterator[workdir_lock.WorkdirLock]:
  """Holds `workdir`'s trainer lock (creating the workdir) on process 0 for the block's duration.

  Every process waits at a barrier until process 0 holds it, so no process writes into a workdir
  another job owns; a refusal on process 0 stops the job (`distributed.fail_fast`). Released on
  every way out of the block (its end, an error, a preemption).

  Raises:
    workdir_lock.WorkdirLockedError: another live trainer holds it (one line naming the holder).
  """
  with workdir_lock.WorkdirLock(workdir, force=force,
                                enabled=jax.process_index() == 0) as lock:
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
      multihost_utils.sync_global_devices('cjepa_workdir_locked')
    yield lock


def check_resume_config(saved: dict[str, Any], spec: RunSpec, step_dir: str,
                        state_signature: Any = None) -> None:
  """Refuses a resume whose config (`spec.settings`) changes the state's shapes, or (unless
  `spec.allow_config_change`) its meaning.

  `state_signature`: what of a flat config shapes the state (`config_lib.resume_changes`);
  default: pretraining's.

  Raises:
    ValueError: naming the keys that differ (saved -> now) and how to continue.
  """
  shape, meaning = config_lib.resume_changes(saved, spec.settings, state_signature)
  def listing(changes):
    return '; '.join(f'{k}: {a!r} -> {b!r}' for k, a, b in
                     ((k, *v) for k, v in sorted(changes.items())))
  if shape:
    raise ValueError(
        f'The checkpoint {step_dir} was saved with another model ({listing(shape)}), so this '
        'config cannot resume it: use a new --workdir, or start a new workdir from its weights '
        'with --config.init_from=<this workdir> (the checkpoint is kept).')
  if meaning and not spec.allow_config_change:
    raise ValueError(
        f'Resuming {step_dir} with a config that changes the run ({listing(meaning)}): pass the '
        'saved values again, use a new --workdir, or add --config.allow_config_change=True to '
        'continue with the new values.')
  for key, (old, new) in sorted(meaning.items()):
    logging.warning('Resuming with a changed config (allow_config_change): %s %r -> %r.',
                    key, old, new)
