"""Orbax checkpointing: asynchronous saves, exact resume onto any mesh, partial restores.

Layout: `WORKDIR/checkpoints/<step>/` holds one orbax step directory per saved step, with two items:

  state/   The train state: a pytree (dicts, optax namedtuples) of jax.Arrays (step, params, EMA
           target params, optimizer state), written by `ocp.args.StandardSave` (OCDBT + zarr).
  config/  The run's config as JSON (`ConfigDict.to_json_best_effort`; tuples come back as lists).

Completeness. orbax 0.12.8 writes `<step>/commit_success.txt` when it finalizes a step, under both
of its atomicity protocols: atomic rename of `<step>.orbax-checkpoint-tmp-<t>/` on local/POSIX
file systems, commit file in place on GCS. A step counts here only when that marker exists, so a
save cut off mid-write (a leftover tmp directory, or a `<step>/` directory without the marker) is
never chosen over the previous complete one: orbax's own step listing on a local file system
accepts any directory named by an integer, so the manager gets a name format that also requires
the marker. Skipped directories are logged as warnings and never deleted: a human decides.

Multi-host: every process calls `save` / `restore` (orbax writes and reads collectively and lets
the primary host write the shared files); nothing here is gated on process 0.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from typing import Any, Iterator, Sequence

import jax
import ml_collections
import orbax.checkpoint as ocp
from absl import logging
from etils import epath

CHECKPOINTS_DIR = 'checkpoints'
STATE_ITEM = 'state'
CONFIG_ITEM = 'config'
# Written by orbax 0.12.8 on finalize under both atomicity protocols (see the module docstring).
COMMIT_MARKER = 'commit_success.txt'
_STEP_RE = re.compile(r'^(0|[1-9]\d*)$')
_TMP_RE = re.compile(r'^(0|[1-9]\d*)\.orbax-checkpoint-tmp')
_MAX_CAUSE_CHARS = 600  # tensorstore errors carry a long JSON spec; keep the message readable.


class CheckpointRestoreError(ValueError):
  """A checkpoint step could not be restored (damaged on disk, or a mismatched target)."""


@dataclasses.dataclass(frozen=True)
class _CommittedNameFormat(ocp.step.NameFormat):
  """orbax's standard `<step>` naming, listing only steps whose commit marker exists."""

  base: Any = dataclasses.field(default_factory=ocp.step.standard_name_format)

  def build_name(self, step: int) -> str:
    return self.base.build_name(step)

  def find_all(self, base_path: epath.PathLike) -> Iterator[ocp.step.Metadata]:
    return (m for m in self.base.find_all(base_path) if _is_committed(m.path))

  def find_step(self, base_path: epath.PathLike, step: int) -> ocp.step.Metadata:
    metadata = self.base.find_step(base_path, step)
    if not _is_committed(metadata.path):
      raise ValueError(f'Checkpoint {metadata.path} is incomplete (no {COMMIT_MARKER}).')
    return metadata


def _absolute(path: str) -> epath.Path:
  """Orbax wants absolute paths: a relative local path is taken from the current directory."""
  p = epath.Path(path)
  return p if '://' in str(path) else epath.Path(os.path.abspath(str(p)))


def _is_committed(step_dir: epath.Path) -> bool:
  return (step_dir / COMMIT_MARKER).exists()


def _complete_steps(root: epath.Path) -> list[int]:
  """Sorted steps of the complete checkpoints directly under `root` (a `checkpoints/` dir)."""
  if not root.is_dir():
    return []
  return sorted(m.step for m in _CommittedNameFormat().find_all(root))


def _incomplete_step_dirs(root: epath.Path) -> list[epath.Path]:
  """Step-like directories under `root` that are not complete checkpoints (cut-off saves)."""
  if not root.is_dir():
    return []
  found = []
  for path in root.iterdir():
    if _TMP_RE.match(path.name) or (_STEP_RE.match(path.name) and path.is_dir()
                                    and not _is_committed(path)):
      found.append(path)
  return sorted(found, key=lambda p: p.name)


def _warn_incomplete(path: epath.Path, latest: int | None) -> None:
  fallback = f'step {latest}' if latest is not None else 'no checkpoint (a fresh start)'
  logging.warning(
      'Skipping incomplete checkpoint directory %s (a save that was cut off: no %s); using %s '
      'instead. Nothing is deleted automatically: remove that directory once you have checked it.',
      path, COMMIT_MARKER, fallback)


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


def _restore_error(step_dir: epath.Path, cause: Exception) -> CheckpointRestoreError:
  """The error for an unreadable step directory: what failed, and how to fall back."""
  text = f'{type(cause).__name__}: {cause}'
  if len(text) > _MAX_CAUSE_CHARS:
    text = text[:_MAX_CAUSE_CHARS] + ' ...'
  earlier = [s for s in _complete_steps(step_dir.parent) if s < int(step_dir.name)]
  fallback = (f'the previous complete checkpoint (step {earlier[-1]})' if earlier
              else 'a fresh start (there is no earlier complete checkpoint)')
  return CheckpointRestoreError(
      f'Could not restore checkpoint {step_dir}: {text}\n'
      f'If this checkpoint is damaged (truncated or corrupted files), delete {step_dir} to fall '
      f'back to {fallback}; checkpoints are never deleted automatically. If instead the target '
      'tree does not match what was saved (a different model or optimizer config), restore with '
      'the config the run was saved with (see its config/ item).')


class Checkpointer:
  """Saves and restores a run's train state (and config) under `workdir/checkpoints/<step>/`.

  Usage in a trainer (every process runs all of it):

    with Checkpointer(workdir, keep=3, save_every_steps=1000) as ckpt:
      step = ckpt.latest_step()
      if step is not None:
        state = ckpt.restore(step, abstract_state)  # Onto the current mesh's shardings.
      for ...:
        ckpt.save(step, state, config)               # Returns at once; writes in the background.
      ckpt.save(last_step, state, config, force=True)
    # Leaving the block waits for the last save.
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
    """
    if keep < 1:
      raise ValueError(f'keep={keep}: keep at least the latest checkpoint (keep >= 1); use '
                       'keep_every_steps to keep more forever.')
    if keep_every_steps < 0 or save_every_steps < 0:
      raise ValueError(f'keep_every_steps={keep_every_steps} and save_every_steps='
                       f'{save_every_steps} must be >= 0 (0 turns them off).')
    self.directory = _absolute(workdir) / CHECKPOINTS_DIR
    self._warned: set[str] = set()
    preserve = [ocp.checkpoint_managers.LatestN(keep)]
    if keep_every_steps:
      preserve.append(ocp.checkpoint_managers.EveryNSteps(keep_every_steps))
    save_policies = [ocp.checkpoint_managers.PreemptionCheckpointingPolicy()]
    if save_every_steps:
      save_policies.append(ocp.checkpoint_managers.FixedIntervalPolicy(save_every_steps))
    options = ocp.CheckpointManagerOptions(
        step_name_format=_CommittedNameFormat(),
        preservation_policy=ocp.checkpoint_managers.AnyPreservationPolicy(preserve),
        save_decision_policy=ocp.checkpoint_managers.AnySavePolicy(save_policies),
        enable_async_checkpointing=async_save,
        create=True,
    )
    self._manager = ocp.CheckpointManager(
        self.directory, item_names=(STATE_ITEM, CONFIG_ITEM), options=options)

  def save(self, step: int, state: Any, config: ml_collections.ConfigDict | dict | None = None,
           *, force: bool = False) -> bool:
    """Saves `state` (and `config` as JSON) at `step` when due; returns whether it saved.

    Due means `step % save_every_steps == 0` (and newer than the latest checkpoint), or `force`.
    Asynchronous when `async_save`: this returns once the arrays are copied off the devices, so the
    caller may donate / overwrite `state` right after. A step that already has a checkpoint is
    left alone (returns False), so a final forced save may follow a periodic one at that step.
    """
    step = int(step)
    if step in self._manager.all_steps():
      return False
    step_dir = self.directory / str(step)
    # On a local file system orbax finalizes by renaming its tmp directory onto `step_dir`, which
    # fails (late, in the background) when a cut-off `step_dir` is in the way. On GCS orbax itself
    # replaces an unfinished step directory, as its commit-file protocol prescribes.
    if (not str(step_dir).startswith('gs://') and step_dir.exists()
        and not _is_committed(step_dir)):
      raise ValueError(
          f'Cannot save step {step}: {step_dir} exists but is not a complete checkpoint (no '
          f'{COMMIT_MARKER}; a save that was cut off). Check it and delete it, then rerun.')
    items = {STATE_ITEM: ocp.args.StandardSave(state)}
    if config is not None:
      items[CONFIG_ITEM] = ocp.args.JsonSave(_config_to_dict(config))
    return self._manager.save(step, args=ocp.args.Composite(**items), force=force)

  def all_steps(self) -> list[int]:
    """Steps of the complete checkpoints on disk, ascending."""
    return _complete_steps(self.directory)

  def latest_step(self) -> int | None:
    """The newest COMPLETE checkpoint's step (read from disk), or None when there is none.

    Logs a warning for each cut-off save it skips (once per directory). Saves still in flight are
    not complete yet and not reported; call `wait()` first to include them.
    """
    steps = self.all_steps()
    latest = steps[-1] if steps else None
    saving = self._manager.is_saving_in_progress()
    for path in _incomplete_step_dirs(self.directory):
      if (saving and _TMP_RE.match(path.name)) or str(path) in self._warned:
        continue  # Our own save in flight, or already reported.
      self._warned.add(str(path))
      _warn_incomplete(path, latest)
    return latest

  def _step_dir(self, step: int | None) -> tuple[int, epath.Path]:
    latest = self.latest_step()
    if step is None:
      if latest is None:
        raise ValueError(f'No complete checkpoint under {self.directory}; pass a workdir that has '
                         f'{CHECKPOINTS_DIR}/<step>/ directories, or start from scratch.')
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
      CheckpointRestoreError: the checkpoint could not be read (damaged, or a mismatched target);
        the message names the step directory and the way to fall back to the previous one.
    """
    step, step_dir = self._step_dir(step)
    target = _abstract_target(abstract_state)
    args = ocp.args.Composite(**{STATE_ITEM: ocp.args.StandardRestore(target)})
    try:
      restored = self._manager.restore(step, args=args)
    except Exception as e:  # pylint: disable=broad-exception-caught
      raise _restore_error(step_dir, e) from e
    return restored[STATE_ITEM]

  def restore_config(self, step: int | None = None) -> dict[str, Any]:
    """The config saved with `step` (None: latest) as a plain dict (tuples come back as lists)."""
    _, step_dir = self._step_dir(step)
    return load_config(str(step_dir))

  def wait(self) -> None:
    """Blocks until every in-flight asynchronous save is complete (and raises its errors)."""
    self._manager.wait_until_finished()
    self._manager.check_for_errors()

  def close(self) -> None:
    """Waits for in-flight saves, then releases orbax's threads."""
    self._manager.wait_until_finished()
    self._manager.close()

  def __enter__(self) -> Checkpointer:
    return self

  def __exit__(self, *exc_info) -> None:
    self.close()


def resolve_checkpoint(path: str) -> tuple[str, int]:
  """Resolves a workdir, its `checkpoints/` dir or one step dir to `(checkpoints_dir, step)`.

  A workdir (or `checkpoints/` dir) resolves to its latest complete step, skipping (with a warning)
  saves that were cut off; a step directory resolves to itself and must be complete.
  """
  p = _absolute(path)
  if _STEP_RE.match(p.name) and p.is_dir():
    if not _is_committed(p):
      raise ValueError(f'{p} is an incomplete checkpoint (no {COMMIT_MARKER}; a save that was cut '
                       'off). Pass its workdir to use the latest complete step instead.')
    return str(p.parent), int(p.name)
  root = p if p.name == CHECKPOINTS_DIR else p / CHECKPOINTS_DIR
  steps = _complete_steps(root)
  latest = steps[-1] if steps else None
  for skipped in _incomplete_step_dirs(root):
    _warn_incomplete(skipped, latest)
  if latest is None:
    raise ValueError(f'No complete checkpoint under {root}; pass a workdir that has '
                     f'{CHECKPOINTS_DIR}/<step>/ (with {COMMIT_MARKER}), or one such step '
                     'directory.')
  return str(root), latest


def load_config(path: str) -> dict[str, Any]:
  """The config saved with a checkpoint (workdir or step dir, as `resolve_checkpoint`) as a dict."""
  root, step = resolve_checkpoint(path)
  config_dir = epath.Path(root) / str(step) / CONFIG_ITEM
  if not config_dir.exists():
    raise ValueError(f'Checkpoint {epath.Path(root) / str(step)} has no {CONFIG_ITEM}/ item: it '
                     'was saved without a config. Pass the config explicitly.')
  with ocp.Checkpointer(ocp.JsonCheckpointHandler()) as ckptr:
    return ckptr.restore(config_dir, args=ocp.args.JsonRestore())


def restore_subtree(path: str, keys: Sequence[str] = (), *,
                    sharding: jax.sharding.Sharding | None = None) -> Any:
  """Restores only `state[keys[0]][keys[1]]...` of a checkpoint, e.g. the target encoder.

  Reads nothing else (no optimizer state), via orbax's partial restore. For the probes:
  `restore_subtree(workdir, ('target_params',))`.

  Args:
    path: A workdir, its `checkpoints/` dir, or one step directory (see `resolve_checkpoint`).
    keys: Dict keys leading to the subtree; () restores the whole state.
    sharding: Placement of every restored leaf (e.g. replicated over a mesh); default: this
      process's first local device.

  Returns:
    The subtree as nested dicts of jax.Arrays (sequences, e.g. optax states, come back as lists).
  """
  root, step = resolve_checkpoint(path)
  state_dir = epath.Path(root) / str(step) / STATE_ITEM
  sharding = sharding or jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  handler = ocp.PyTreeCheckpointHandler()
  try:
    node = handler.metadata(state_dir).tree
  except Exception as e:  # pylint: disable=broad-exception-caught
    raise _restore_error(state_dir.parent, e) from e
  for i, key in enumerate(keys):
    if not isinstance(node, dict) or key not in node:
      where = 'state' + ''.join(f'[{k!r}]' for k in keys[:i])
      have = sorted(node) if isinstance(node, dict) else type(node).__name__
      raise ValueError(f'No key {key!r} in {where} of {state_dir}; available: {have}.')
    node = node[key]
  target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=sharding), node)
  for key in reversed(tuple(keys)):
    target = {key: target}
  args = ocp.args.PyTreeRestore(
      item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target),
      partial_restore=True)
  try:
    with ocp.Checkpointer(handler) as ckptr:
      restored = ckptr.restore(state_dir, args=args)
  except Exception as e:  # pylint: disable=broad-exception-caught
    raise _restore_error(state_dir.parent, e) from e
  for key in keys:
    restored = restored[key]
  return restored
