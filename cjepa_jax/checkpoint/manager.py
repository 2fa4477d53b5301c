"""The checkpoint manager: orbax's, with asynchronous saves, exact resume onto any mesh,
integrity-checked restores and failed saves that say so.

`Checkpointer(workdir)` saves and restores a run's state under `WORKDIR/checkpoints/<step>/`
(`layout`), records a checksum per array with every save and checks them on every restore
(`integrity`), and raises the one-line errors of `errors`. Reading a checkpoint by path (the
probes, `init_from`) is `reading`.

Start-up. `Checkpointer(...)` creates `checkpoints/` and writes and removes a probe file in it, so
an unwritable workdir fails at once (`CheckpointWriteError`) rather than at the first save.
`report_incomplete()` (the trainer calls it at start-up) moves cut-off saves aside (`layout`).
`restore_latest` falls back from a damaged newest step to the newest one that verifies, with a
warning, and moves the damaged one aside (never deletes it).

Failed saves. `save` raises `CheckpointSaveError` (one line: the step directory, the OS error, the
untouched last complete checkpoint, the fix) for failures it sees synchronously; a failure in the
background write (disk full, directory vanished) is raised by the next `check()` (cheap and
non-blocking, the trainer calls it every step), `save`, `wait` or `close`. orbax itself keeps that
error in its save-finalize thread: its `CheckpointManager.check_for_errors()` does not see it, so
without `check()` it only surfaced at the next save, one interval later. A failed save never
finalizes, so it never removes older checkpoints: the last complete one stays as it was.
  The ~5-minute hang: with orbax's default `AsyncOptions(create_directories_asynchronously=True)`
the step's tmp directory is created in a background thread while the item handlers' writer
threads (`serialize_shardings`, `array_type_handler`, `json_ch_save`,
`write_metadata_after_commits`) wait for its 'step_directory_creation' signal in orbax's
key-value signalling client, with `multihost.coordination_timeout()`, a fixed 300 s
(`orbax.checkpoint._src.multihost.multihost._DEFAULT_BARRIER_TIMEOUT`, not settable through any
option). When creating the directory fails (not writable, a file in the way, a vanished parent)
the signal never comes: the failure itself reaches the finalize thread at once, but those
non-daemon threads block for 300 s, so the process cannot exit (and the run does not end) until
they time out. Here the directories are created synchronously in `save`
(`create_directories_asynchronously=False`: a few mkdirs in the blocking part of the save), so
that failure raises at once from `save` and no thread waits on a signal. Failures after that
(writing the arrays) end orbax's background thread with the error, which `check()` reports.
  Multi-host: a host whose write fails raises on that host; the others would wait at orbax's
'async_write_complete' barrier (`AsyncOptions.timeout_secs`, 1200 s) unless the failing process's
exit ends the job first (JAX's coordination service notices a dead process).

Multi-host: every process calls `save` / `restore` (orbax writes and reads collectively and lets
the primary host write the shared files); only `report_incomplete`'s renames (between two
barriers) are gated on process 0.

Why this module is longer than 450 lines: it is one class whose save, listing and restore methods
share state (the save in flight, the newest complete step, the cut-off saves already reported);
what stands alone is in its own module (`layout`, `integrity`, `errors`, `reading`).
"""

from __future__ import annotations

import json
import os
import re
from typing import Any

import jax
import ml_collections
import orbax.checkpoint as ocp
from absl import logging
from etils import epath

from cjepa_jax.checkpoint import errors
from cjepa_jax.checkpoint import integrity
from cjepa_jax.checkpoint import layout
from cjepa_jax.checkpoint import reading


def _config_to_dict(config: ml_collections.ConfigDict | dict[str, Any]) -> dict[str, Any]:
  """A JSON-serializable dict of `config` (tuples become lists; odd values become strings)."""
  if isinstance(config, ml_collections.ConfigDict):
    return json.loads(config.to_json_best_effort())
  if isinstance(config, dict):
    return json.loads(json.dumps(config, default=str))
  raise ValueError(f'config must be an ml_collections.ConfigDict or a dict, got {type(config)}.')


def _abstract_target(abstract_state: Any) -> Any:
  """Checks / converts every leaf to a `jax.ShapeDtypeStruct` that carries a sharding."""

  def convert(path, leaf):
    if isinstance(leaf, jax.Array):  # A live array: restore into its shape and placement.
      return jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=leaf.sharding)
    if isinstance(leaf, jax.ShapeDtypeStruct):
      if leaf.sharding is None:
        raise ValueError(
            f'abstract_state leaf {jax.tree_util.keystr(path)} has no sharding, so orbax would '
            'restore it as a host numpy array. Give every leaf a sharding, e.g. jax.tree.map('
            'lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), '
            'jax.eval_shape(init_fn), shardings).')
      return leaf
    raise ValueError(f'abstract_state leaf {jax.tree_util.keystr(path)} is a {type(leaf)}; '
                     'expected jax.ShapeDtypeStruct (with a sharding) or jax.Array.')

  return jax.tree_util.tree_map_with_path(convert, abstract_state)


class Checkpointer:
  """Saves and restores a run's train state (and config) under `workdir/checkpoints/<step>/`.

  Usage in a trainer (every process runs all of it):

    with Checkpointer(workdir, keep=3, save_every_steps=1000) as ckpt:
      ckpt.report_incomplete()                        # Moves cut-off saves aside, with warnings.
      step, state = ckpt.restore_latest(abstract_state)  # (None, None): nothing saved yet.
      extra = ckpt.restore_extra(step) if step is not None else {}
      for ...:
        ckpt.check()                                  # Raises if a background save failed.
        ckpt.save(step, state, config, extra={...})   # Returns at once; writes in the background.
      ckpt.save(last_step, state, config, force=True)
    # Leaving the block waits for the last save (and raises if it failed).
  """

  def __init__(self, workdir: str, *, keep: int = 3, keep_every_steps: int = 0,
               save_every_steps: int = 0, async_save: bool = True):
    """Opens (creating it if needed) the checkpoint directory `workdir/checkpoints`.

    Args:
      workdir: The run directory (local path or gs://...).
      keep: How many of the latest checkpoints to keep (>= 1); older ones are deleted on save.
      keep_every_steps: > 0: also keep, forever, every checkpoint whose step is a multiple of it.
      save_every_steps: > 0: `save` writes when `step % save_every_steps == 0`; 0: only forced.
      async_save: Write in a background thread; `save` returns once the arrays are on the host.

    Raises:
      errors.CheckpointWriteError: `workdir/checkpoints` cannot be created or written.
    """
    if keep < 1:
      raise ValueError(f'keep={keep}: keep at least the latest checkpoint (keep >= 1); use '
                       'keep_every_steps to keep more forever.')
    if keep_every_steps < 0 or save_every_steps < 0:
      raise ValueError(f'keep_every_steps={keep_every_steps} and save_every_steps='
                       f'{save_every_steps} must be >= 0 (0 turns them off).')
    self.directory = layout.absolute(workdir) / layout.CHECKPOINTS_DIR
    self.check_writable()
    self._warned: set[str] = set()
    self._async = async_save
    self._pending: int | None = None  # The step of the async save in flight (or not yet joined).
    steps = self.all_steps()
    self._last_good: int | None = steps[-1] if steps else None  # Newest complete step.
    preserve = [ocp.checkpoint_managers.LatestN(keep)]
    if keep_every_steps:
      preserve.append(ocp.checkpoint_managers.EveryNSteps(keep_every_steps))
    save_policies = [ocp.checkpoint_managers.PreemptionCheckpointingPolicy()]
    if save_every_steps:
      save_policies.append(ocp.checkpoint_managers.FixedIntervalPolicy(save_every_steps))
    options = ocp.CheckpointManagerOptions(
        step_name_format=layout.CommittedNameFormat(),
        preservation_policy=ocp.checkpoint_managers.AnyPreservationPolicy(preserve),
        save_decision_policy=ocp.checkpoint_managers.AnySavePolicy(save_policies),
        enable_async_checkpointing=async_save,
        # Synchronous mkdirs: a directory that cannot be created fails `save` at once, instead of
        # leaving orbax's writer threads waiting 300 s for a signal (see the module docstring).
        async_options=ocp.AsyncOptions(create_directories_asynchronously=False),
        create=True,
    )
    self._manager = ocp.CheckpointManager(
        self.directory, item_names=(layout.STATE_ITEM, layout.CONFIG_ITEM, layout.META_ITEM),
        options=options)

  def check_writable(self) -> None:
    """Creates `workdir/checkpoints` and writes and removes a probe file in it.

    Raises:
      errors.CheckpointWriteError: naming the directory and the OS error.
    """
    probe = self.directory / f'.write-probe-{jax.process_index()}-{os.getpid()}'
    try:
      self.directory.mkdir(parents=True, exist_ok=True)
      probe.write_text('probe')
      probe.unlink()
    except Exception as e:  # pylint: disable=broad-exception-caught  (gfile raises its own types)
      raise errors.CheckpointWriteError(
          f'Checkpoint directory {self.directory} is not writable: {errors.os_error_text(e)}; '
          'pass a --workdir on a writable disk.') from e

  # Saving ----------------------------------------------------------------------------------------

  def save(self, step: int, state: Any, config: ml_collections.ConfigDict | dict | None = None,
           *, force: bool = False, extra: dict[str, Any] | None = None) -> bool:
    """Saves `state` (and `config`, checksums and `extra` as JSON) at `step` when due.

    Due means `step % save_every_steps == 0` (and newer than the latest checkpoint), or `force`.
    Asynchronous when `async_save`: this returns once the arrays are copied off the devices (and
    their checksums computed), so the caller may donate / overwrite `state` right after. A step
    that already has a checkpoint is left alone (returns False), so a final forced save may follow
    a periodic one at that step.

    Args:
      step: The train step.
      state: The train state (pytree of jax.Arrays).
      config: The run's config, saved as JSON beside the state.
      force: Save even when not due.
      extra: A small JSON-able dict saved with the step; read back with `restore_extra`.

    Returns:
      Whether a save was started.

    Raises:
      errors.CheckpointSaveError: this save (or the previous background one) failed.
      ValueError: a cut-off save of this step is in the way (see `report_incomplete`).
    """
    step = int(step)
    self.check()
    if step in self._manager.all_steps() or not (force or self._manager.should_save(step)):
      return False
    step_dir = self.directory / str(step)
    # On a local file system orbax finalizes by renaming its tmp directory onto `step_dir`, which
    # fails (late, in the background) when a cut-off `step_dir` is in the way. On GCS orbax itself
    # replaces an unfinished step directory, as its commit-file protocol prescribes.
    if layout.is_local(step_dir) and step_dir.exists() and not layout.is_committed(step_dir):
      raise ValueError(
          f'Cannot save step {step}: {step_dir} exists but is not a complete checkpoint (no '
          f'{layout.COMMIT_MARKER}; a save that was cut off). Check it, then move it aside or '
          'delete it (Checkpointer.report_incomplete() moves such directories aside), and rerun.')
    digest = integrity.digest(state)
    if digest.nonfinite:
      logging.warning('Saving step %d with NaN/Inf in %s (and %d more array(s)): restoring it will '
                      'fail its integrity check.', step, digest.nonfinite[0],
                      len(digest.nonfinite) - 1)
    meta = {'format': integrity.META_FORMAT, 'checksums': digest.checksums, 'dtypes': digest.dtypes,
            'extra': json.loads(json.dumps(extra or {}, default=str))}
    items = {layout.STATE_ITEM: ocp.args.StandardSave(state),
             layout.META_ITEM: ocp.args.JsonSave(meta)}
    if config is not None:
      items[layout.CONFIG_ITEM] = ocp.args.JsonSave(_config_to_dict(config))
    self._join_pending()  # orbax waits for the previous save here anyway; name its failure.
    try:
      # `force`: the decision is made above; orbax must not evaluate its policies a second time.
      saved = self._manager.save(step, args=ocp.args.Composite(**items), force=True)
    except Exception as e:  # pylint: disable=broad-exception-caught
      raise self._save_error(step, e) from e
    if saved and self._async:
      self._pending = step  # Joined by `check` / `wait` once orbax's finalize thread is done.
    elif saved:
      self._last_good = step
    return saved

  def check(self) -> None:
    """Raises CheckpointSaveError if the background save has failed. Never blocks: call it often.

    A finished background save (failed or not) is joined here; one still running is left alone.
    """
    if self._pending is not None and not self._manager.is_saving_in_progress():
      self._join_pending()  # Finished: the join returns at once.

  def _join_pending(self) -> None:
    """Waits for the in-flight save, if any; raises its failure as CheckpointSaveError (once)."""
    if self._pending is None:
      return
    step, self._pending = self._pending, None
    try:
      self._manager.wait_until_finished()
    except Exception as e:  # pylint: disable=broad-exception-caught
      raise self._save_error(step, e) from e
    self._last_good = step

  def _save_error(self, step: int, cause: BaseException) -> errors.CheckpointSaveError:
    last = (f'the last complete checkpoint (step {self._last_good})' if self._last_good is not None
            else 'no earlier checkpoint exists, and nothing')
    return errors.CheckpointSaveError(
        f'Saving checkpoint {self.directory / str(step)} failed: {errors.os_error_text(cause)}; '
        f'{last} is untouched. Free space on (or fix) the disk of {self.directory}, then rerun '
        'with the same --workdir to resume from it.')

  def wait(self) -> None:
    """Blocks until the in-flight asynchronous save is complete; raises CheckpointSaveError."""
    self._join_pending()

  def close(self) -> None:
    """Waits for the in-flight save (raising its failure), then releases orbax's threads."""
    try:
      self._join_pending()
    finally:
      try:
        self._manager.close()
      except Exception as e:  # pylint: disable=broad-exception-caught
        # Only a failure already raised above (orbax re-raises it once per thread).
        logging.warning('Closing the checkpoint manager of %s: %s', self.directory,
                        errors.os_error_text(e))

  def __enter__(self) -> Checkpointer:
    return self

  def __exit__(self, exc_type, *exc_info) -> None:
    if exc_type is None:
      self.close()
      return
    try:  # An error is already on its way out: report a failed save, but do not replace it.
      self.close()
    except errors.CheckpointSaveError as e:
      logging.error('%s', e)

  # Listing ---------------------------------------------------------------------------------------

  def all_steps(self) -> list[int]:
    """Steps of the complete checkpoints on disk, ascending."""
    return layout.complete_steps(self.directory)

  def latest_step(self) -> int | None:
    """The newest COMPLETE checkpoint's step (read from disk), or None when there is none.

    Logs a warning for each cut-off save it skips (once per directory). Saves still in flight are
    not complete yet and not reported; call `wait()` first to include them.
    """
    steps = self.all_steps()
    latest = steps[-1] if steps else None
    saving = self._manager.is_saving_in_progress()
    for path in layout.incomplete_step_dirs(self.directory):
      if (saving and layout.TMP_RE.match(path.name)) or str(path) in self._warned:
        continue  # Our own save in flight, or already reported.
      self._warned.add(str(path))
      layout.warn_incomplete(path, latest)
    return latest

  def report_incomplete(self) -> list[str]:
    """Reports each cut-off save (one warning) and moves it aside; returns the new paths.

    A `<step>/` directory without orbax's commit marker, or a leftover `<step>.orbax-checkpoint-
    tmp*` directory, is renamed to `<step>.incomplete-<UTC mtime>` in the same directory (a
    non-step name: never listed, never restored, never deleted), so that the run can save that
    step again when it gets there. On multi-host every process lists them, then (after a barrier)
    process 0 renames them and logs, then all meet at a second barrier. On GCS nothing is renamed
    (orbax replaces an unfinished step directory itself). Call it at start-up, before any save.

    Returns:
      The paths they were moved to (the same list on every process).
    """
    steps = self.all_steps()
    latest = f'step {steps[-1]}' if steps else 'a fresh start (no complete checkpoint)'
    saving = self._manager.is_saving_in_progress()
    found = []  # (path, step, new path or None): every process lists before anything moves.
    taken: set[str] = set()
    for path in layout.incomplete_step_dirs(self.directory):
      if saving and layout.TMP_RE.match(path.name):
        continue  # Our own save in flight.
      step = int(re.match(r'\d+', path.name).group())
      self._warned.add(str(path))
      target = layout.aside_path(path, step, taken) if layout.is_local(path) else None
      found.append((path, step, target))
    layout.sync_processes('cjepa_checkpoint_report_incomplete_listed')
    for path, step, target in found:
      if jax.process_index() != 0:
        continue
      if target is None:
        logging.warning(
            'Incomplete checkpoint directory %s (a save of step %d that was cut off: no %s); '
            'training resumes from %s and orbax replaces it when step %d is saved again.',
            path, step, layout.COMMIT_MARKER, latest, step)
      else:
        path.rename(target)
        logging.warning(
            'Incomplete checkpoint directory %s (a save of step %d that was cut off: no %s): '
            'moved aside to %s so that step %d can be saved again; training resumes from %s. '
            'Nothing is deleted: remove %s once you have checked it.',
            path, step, layout.COMMIT_MARKER, target, step, latest, target)
    layout.sync_processes('cjepa_checkpoint_report_incomplete_moved')
    return [str(target) for _, _, target in found if target is not None]

  # Restoring -------------------------------------------------------------------------------------

  def _step_dir(self, step: int | None) -> tuple[int, epath.Path]:
    latest = self.latest_step()
    if step is None:
      if latest is None:
        raise ValueError(f'No complete checkpoint under {self.directory}; pass a workdir that has '
                         f'{layout.CHECKPOINTS_DIR}/<step>/ directories, or start from scratch.')
      step = latest
    step = int(step)
    if step not in self.all_steps():
      raise ValueError(f'No complete checkpoint for step {step} under {self.directory}; complete '
                       f'steps: {self.all_steps()}.')
    return step, self.directory / str(step)

  def restore(self, step: int | None, abstract_state: Any) -> Any:
    """Restores the state saved at `step` (None: the latest complete one) onto new shardings.

    Args:
      step: The step to restore, or None for the latest complete checkpoint.
      abstract_state: The target tree, with the saved tree's structure (namedtuples included):
        `jax.ShapeDtypeStruct` leaves carrying the CURRENT mesh's shardings (e.g.
        `jax.eval_shape(init)` with shardings attached), or live jax.Arrays. The checkpoint may
        have been written from any device count / sharding.

    Returns:
      The state, with `abstract_state`'s tree structure and shardings.

    Raises:
      errors.CheckpointIntegrityError: an array differs from its checksum recorded at save time, or
        holds NaN/Inf; the message names the step directory and the array.
      CheckpointRestoreError: the checkpoint could not be read (damaged, or a mismatched target);
        the message names the step directory and the way to fall back to the previous one.
    """
    step, step_dir = self._step_dir(step)
    target = _abstract_target(abstract_state)
    args = ocp.args.Composite(**{layout.STATE_ITEM: ocp.args.StandardRestore(target)})
    try:
      restored = self._manager.restore(step, args=args)
    except Exception as e:  # pylint: disable=broad-exception-caught
      raise errors.restore_error(step_dir, e) from e
    state = restored[layout.STATE_ITEM]
    integrity.verify(step_dir, state)
    return state

  def restore_latest(self, abstract_state: Any) -> tuple[int | None, Any]:
    """Restores the newest complete checkpoint that reads and verifies: `(step, state)`.

    A newer one that fails (`errors.CheckpointRestoreError`, integrity included) is reported with a
    warning naming it and why, and skipped; nothing is deleted. `(None, None)` when there is no
    complete checkpoint.

    Raises:
      errors.CheckpointRestoreError: every complete checkpoint failed; the message lists them.
    """
    target = _abstract_target(abstract_state)
    self.latest_step()  # Warns about cut-off saves.
    failures = []
    failed_steps = []
    for step in reversed(self.all_steps()):
      step_dir = self.directory / str(step)
      try:
        state = self.restore(step, target)
      except errors.CheckpointRestoreError as e:
        reason = str(e).split(' If it is damaged,')[0]
        logging.warning('Not resuming from %s: %s Trying the previous complete checkpoint; '
                        'nothing is deleted.', step_dir, reason)
        failures.append(f'step {step}: {reason}')
        failed_steps.append(step)
        continue
      if failed_steps:
        self._move_aside_damaged(failed_steps, step)
      return step, state
    if not failures:
      return None, None
    raise errors.CheckpointRestoreError(
        f'No checkpoint under {self.directory} could be restored ({" | ".join(failures)}). If the '
        'model or optimizer config changed, resume with the config the run was saved with; if '
        'the files are damaged, move the checkpoints directory aside to start afresh.')

  def _move_aside_damaged(self, steps: list[int], resumed: int) -> None:
    """Renames the newer checkpoints that failed to `<step>.damaged-<UTC mtime>` (never deletes).

    Only called once an older checkpoint restored into the same target, which shows the target is
    right and the newer ones are damaged. Without the rename the resumed run could not save those
    steps again (and a later start would try them first again).
    """
    taken: set[str] = set()
    moves = [(self.directory / str(s), s) for s in steps]
    moves = [(p, s, layout.aside_path(p, s, taken, 'damaged') if layout.is_local(p) else None)
             for p, s in moves]
    layout.sync_processes('cjepa_checkpoint_damaged_listed')
    if jax.process_index() == 0:
      for path, step, target in moves:
        if target is None:
          logging.warning('Checkpoint %s is damaged; resuming from step %d. Move it aside by hand '
                          'before the run reaches step %d again.', path, resumed, step)
          continue
        path.rename(target)
        logging.warning('Checkpoint %s is damaged: moved aside to %s (nothing is deleted) so that '
                        'the run can save step %d again; resuming from step %d.', path, target,
                        step, resumed)
    layout.sync_processes('cjepa_checkpoint_damaged_moved')
    self._manager.reload()  # Forget the moved steps.

  def restore_config(self, step: int | None = None) -> dict[str, Any]:
    """The config saved with `step` (None: latest) as a plain dict (tuples come back as lists)."""
    _, step_dir = self._step_dir(step)
    return reading.load_config(str(step_dir))

  def restore_extra(self, step: int | None = None) -> dict[str, Any]:
    """The `extra` dict saved with `step` (None: latest); {} for checkpoints saved without one."""
    _, step_dir = self._step_dir(step)
    meta = integrity.read_meta(step_dir)
    return dict((meta or {}).get('extra') or {})
