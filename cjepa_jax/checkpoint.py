"""Orbax checkpointing: asynchronous saves, exact resume onto any mesh, integrity-checked restores.

Layout: `WORKDIR/checkpoints/<step>/` holds one orbax step directory per saved step, with items:

  state/   The train state: a pytree (dicts, optax namedtuples) of jax.Arrays (step, params, EMA
           target params, optimizer state), written by `ocp.args.StandardSave` (OCDBT + zarr).
  config/  The run's config as JSON (`ConfigDict.to_json_best_effort`; tuples come back as lists).
  meta/    JSON: `{'format': 1, 'checksums': {name: int}, 'dtypes': {name: str}, 'extra': {...}}`,
           a checksum per array of the state (names as orbax's: 'opt_state.0.mu.encoder.kernel')
           and the trainer's small `extra` dict (e.g. `data_skipped`). Older checkpoints lack it.

Start-up. `Checkpointer(...)` creates `checkpoints/` and writes and removes a probe file in it, so
an unwritable workdir fails at once (`CheckpointWriteError`) rather than at the first save.

Completeness. orbax 0.12.8 writes `<step>/commit_success.txt` when it finalizes a step, under both
of its atomicity protocols: atomic rename of `<step>.orbax-checkpoint-tmp[-<t>]/` on local/POSIX
file systems, commit file in place on GCS. A step counts here only when that marker exists, so a
save cut off mid-write (a leftover tmp directory, or a `<step>/` directory without the marker) is
never chosen over the previous complete one: orbax's own step listing on a local file system
accepts any directory named by an integer, so the manager gets a name format that also requires
the marker. `Checkpointer.report_incomplete()` (the trainer calls it at start-up) logs one warning
per such directory and renames it (process 0 only) to `<step>.incomplete-<UTC mtime>` beside it,
so that the run can save that step again later. Nothing is ever deleted here: a human decides.

Integrity. `save` computes, on the devices and in one jitted call, a 32-bit checksum per array:
its bits as uint32 words (16- and 8-bit types widened, 64-bit types split in two), each word
times an odd multiplier that depends on its row-major position, `(i * 2654435761 + 1) | 1`,
summed with uint32 wraparound. Integer wraparound sums are exact and order independent, so the
value is the same whatever the mesh or sharding (or host count) the state is saved from or
restored onto. `restore`, `restore_latest` and `restore_subtree` recompute the checksums of what
they read, check that every floating array is finite, and raise `CheckpointIntegrityError` (a
`CheckpointRestoreError`) naming the step directory and the first bad array. Checkpoints without
checksums (saved before this existed) still restore, with a one-time info that they cannot be
verified. `restore_latest` falls back from a damaged newest step to the newest one that
verifies, with a warning, and deletes nothing.

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
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import re
from typing import Any, Iterator, Sequence

import jax
from jax import lax
import jax.numpy as jnp
import ml_collections
import orbax.checkpoint as ocp
from absl import logging
from etils import epath

from cjepa_jax.models import jepa

CHECKPOINTS_DIR = 'checkpoints'
STATE_ITEM = 'state'
CONFIG_ITEM = 'config'
META_ITEM = 'meta'
META_FORMAT = 1
# Written by orbax 0.12.8 on finalize under both atomicity protocols (see the module docstring).
COMMIT_MARKER = 'commit_success.txt'
_STEP_RE = re.compile(r'^(0|[1-9]\d*)$')
_TMP_RE = re.compile(r'^(0|[1-9]\d*)\.orbax-checkpoint-tmp')
_MAX_CAUSE_CHARS = 600  # tensorstore errors carry a long JSON spec; keep the message readable.
_MAX_OS_ERROR_CHARS = 300
_GOLDEN = 2654435761  # Knuth's multiplicative-hash constant, 2**32 / phi (odd).
_UNVERIFIED_LOGGED: set[str] = set()  # Checkpoints without checksums already reported (info).


class CheckpointRestoreError(ValueError):
  """A checkpoint step could not be restored (damaged on disk, or a mismatched target)."""


class CheckpointIntegrityError(CheckpointRestoreError):
  """A restored array differs from its checksum recorded at save time, or is not finite."""


class CheckpointSaveError(ValueError):
  """A save failed (synchronously or in the background); earlier checkpoints are untouched."""


class CheckpointWriteError(ValueError):
  """`workdir/checkpoints` cannot be created or written."""


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


def _is_local(path: epath.Path) -> bool:
  return '://' not in str(path)


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


def _aside_path(path: epath.Path, step: int, taken: set[str], tag: str = 'incomplete'
                ) -> epath.Path:
  """A free non-step name beside `path`: `<step>.<tag>-<UTC mtime>[-<n>]`.

  The directory's own mtime (not the clock) names it, so that every host computes the same name.
  orbax's tmp suffix is dropped, so that no orbax clean-up of tmp directories ever matches it.
  """
  mtime = datetime.datetime.fromtimestamp(os.stat(str(path)).st_mtime, datetime.timezone.utc)
  base = f'{step}.{tag}-{mtime:%Y%m%dT%H%M%SZ}'
  target, n = path.parent / base, 1
  while target.exists() or str(target) in taken:  # `taken`: chosen for others, not moved yet.
    target, n = path.parent / f'{base}-{n}', n + 1
  taken.add(str(target))
  return target


def _sync_processes(name: str) -> None:
  """A barrier across all processes (none needed, and none taken, in a single process)."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    multihost_utils.sync_global_devices(name)


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


def _one_line(text: str, limit: int) -> str:
  text = ' '.join(str(text).split())
  return text if len(text) <= limit else text[:limit] + ' ...'


def _os_error_text(error: BaseException) -> str:
  """The OS-level cause of a failed write, without orbax's / tensorstore's wrapping.

  A Python OSError in the cause chain gives `[Errno 28] No space left on device: '/x'`. A
  tensorstore error is one long line of nested context ending in the OS error, e.g. `Error writing
  "w/0" in OCDBT database at local file "...": Failed writing: "...": Failed to write 258932 bytes
  to file 6: File too large [os_error_code='27']`: its last segment is kept.
  """
  seen, cause = set(), error
  while cause is not None and id(cause) not in seen:
    if isinstance(cause, OSError) and cause.errno is not None:
      return _one_line(str(cause), _MAX_OS_ERROR_CHARS)
    seen.add(id(cause))
    cause = cause.__cause__ or cause.__context__
  text = _one_line(str(error), 10 * _MAX_OS_ERROR_CHARS)
  if 'os_error_code' in text and '": ' in text:
    return _one_line(text.rsplit('": ', 1)[-1], _MAX_OS_ERROR_CHARS)
  return _one_line(f'{type(error).__name__}: {text}', _MAX_OS_ERROR_CHARS)


def _restore_error(step_dir: epath.Path, cause: Exception) -> CheckpointRestoreError:
  """The error for an unreadable step directory: what failed, and how to fall back."""
  text = _one_line(f'{type(cause).__name__}: {cause}', _MAX_CAUSE_CHARS)
  return CheckpointRestoreError(
      f'Could not restore checkpoint {step_dir}: {text}. {_fallback_hint(step_dir)} If instead '
      'the target tree does not match what was saved (a different model or optimizer config), '
      'restore with the config the run was saved with (see its config/ item).')


def _fallback_hint(step_dir: epath.Path) -> str:
  """How to get past a damaged step directory, naming the step that would be used instead."""
  earlier = [s for s in _complete_steps(step_dir.parent) if s < int(step_dir.name)]
  fallback = (f'the previous complete checkpoint (step {earlier[-1]})' if earlier
              else 'a fresh start (there is no earlier complete checkpoint)')
  return (f'If it is damaged, Checkpointer.restore_latest falls back by itself; by hand, move '
          f'{step_dir} aside (or delete {step_dir}) to fall back to {fallback}; checkpoints are '
          'never deleted automatically.')


# Checksums ---------------------------------------------------------------------------------------


def _as_words(x: jax.Array) -> jax.Array:
  """`x`'s bits as uint32 words: one per element (two, on a new last axis, for 64-bit types)."""
  dtype = jnp.dtype(x.dtype)
  if jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key):
    return _as_words(jax.random.key_data(x))
  if dtype == jnp.bool_:
    return x.astype(jnp.uint32)
  if dtype.itemsize == 8:
    return lax.bitcast_convert_type(x, jnp.uint32)
  unsigned = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32}[dtype.itemsize]
  return lax.bitcast_convert_type(x, unsigned).astype(jnp.uint32)


def _position_multipliers(shape: tuple[int, ...]) -> jax.Array:
  """`(i * 2654435761 + 1) | 1` (uint32) for each element's row-major flat index i (mod 2**32).

  Built from per-axis iotas rather than a flattened arange, so that XLA shards it like the words
  (no reshape of a sharded array). Odd multipliers never map a non-zero word to zero.
  """
  index = jnp.zeros(shape, jnp.uint32)
  stride = 1
  for axis in reversed(range(len(shape))):
    index = index + lax.broadcasted_iota(jnp.uint32, shape, axis) * jnp.uint32(stride % 2**32)
    stride *= shape[axis]
  return (index * jnp.uint32(_GOLDEN) + jnp.uint32(1)) | jnp.uint32(1)


def array_checksum(x: jax.Array) -> jax.Array:
  """A uint32 checksum of `x`'s bits and their positions; the same for every sharding of `x`.

  sum_i words[i] * ((i * 2654435761 + 1) | 1) mod 2**32. Traceable (use it under jit).
  """
  words = _as_words(jnp.asarray(x))
  return jnp.sum(words * _position_multipliers(words.shape), dtype=jnp.uint32)


@jax.jit
def _digest_leaves(leaves: list[jax.Array]) -> tuple[list[jax.Array], list[jax.Array]]:
  """Every leaf's checksum and whether it is finite (non-floating leaves count as finite)."""
  sums = [array_checksum(x) for x in leaves]
  finite = [jnp.all(jnp.isfinite(x)) if jnp.issubdtype(x.dtype, jnp.inexact) else jnp.bool_(True)
            for x in leaves]
  return sums, finite


def _key_name(key: Any) -> str:
  for attr in ('key', 'idx', 'name'):  # DictKey / FlattenedIndexKey, SequenceKey, GetAttrKey.
    if hasattr(key, attr):
      return str(getattr(key, attr))
  return str(key)


def _leaf_name(prefix: Sequence[str], path: Sequence[Any]) -> str:
  """orbax's name for a leaf ('opt_state.0.mu.encoder.kernel'): the same whether namedtuples
  come back as namedtuples (`restore`) or as dicts (`restore_subtree`)."""
  return '.'.join([*map(str, prefix), *(_key_name(k) for k in path)])


@dataclasses.dataclass(frozen=True)
class _Digest:
  checksums: dict[str, int]  # Leaf name -> checksum, in tree order.
  dtypes: dict[str, str]
  nonfinite: list[str]       # Names of floating leaves with a NaN or Inf.


def _digest(tree: Any, prefix: Sequence[str] = ()) -> _Digest:
  """Checksums and finiteness of every array in `tree`, computed where the arrays live.

  One jitted call per set of devices the leaves live on (one, for a trainer's state), then one
  device_get for all. Non-jax leaves (numpy, Python scalars) are put on the default device.
  """
  flat = jax.tree_util.tree_flatten_with_path(tree)[0]
  names = [_leaf_name(prefix, path) for path, _ in flat]
  leaves = [x if isinstance(x, jax.Array) else jnp.asarray(x) for _, x in flat]
  groups: dict[frozenset, list[int]] = {}
  for i, leaf in enumerate(leaves):
    groups.setdefault(frozenset(leaf.sharding.device_set), []).append(i)
  results = jax.device_get([_digest_leaves([leaves[i] for i in index])
                            for index in groups.values()])
  sums: dict[int, int] = {}
  finite: dict[int, bool] = {}
  for index, (group_sums, group_finite) in zip(groups.values(), results):
    for i, s, f in zip(index, group_sums, group_finite):
      sums[i], finite[i] = int(s), bool(f)
  return _Digest(checksums={names[i]: sums[i] for i in range(len(names))},
                 dtypes={names[i]: str(leaves[i].dtype) for i in range(len(names))},
                 nonfinite=[names[i] for i in range(len(names)) if not finite[i]])


def state_checksums(tree: Any) -> dict[str, int]:
  """Checksum (see `array_checksum`) of every array in `tree`, by orbax leaf name."""
  return _digest(tree).checksums


def _read_meta(step_dir: epath.Path) -> dict[str, Any] | None:
  """The step's `meta/` item (checksums, extra), or None for checkpoints saved without one."""
  meta_dir = step_dir / META_ITEM
  if not meta_dir.exists():
    return None
  try:
    with ocp.Checkpointer(ocp.JsonCheckpointHandler()) as ckptr:
      meta = ckptr.restore(meta_dir, args=ocp.args.JsonRestore())
  except Exception as e:  # pylint: disable=broad-exception-caught
    raise _restore_error(step_dir, e) from e
  if not isinstance(meta, dict):
    raise CheckpointIntegrityError(
        f'Checkpoint {step_dir} failed its integrity check: {meta_dir} holds a '
        f'{type(meta).__name__}, not a dict. {_fallback_hint(step_dir)}')
  return meta


def _verify(step_dir: epath.Path, tree: Any, prefix: Sequence[str] = ()) -> None:
  """Raises CheckpointIntegrityError unless `tree` (restored from `step_dir`) is as saved.

  Checks every leaf against its recorded checksum (when recorded, with the same dtype: a restore
  that casts cannot be compared) and that every floating leaf is finite.
  """
  meta = _read_meta(step_dir)
  digest = _digest(tree, prefix)
  recorded = (meta or {}).get('checksums')
  if recorded is None:
    if str(step_dir) not in _UNVERIFIED_LOGGED:
      _UNVERIFIED_LOGGED.add(str(step_dir))
      logging.info('Checkpoint %s has no recorded checksums (saved before they existed): its '
                   'arrays are checked for NaN/Inf only.', step_dir)
  else:
    dtypes = meta.get('dtypes', {})
    for name, got in digest.checksums.items():
      want = recorded.get(name)
      if want is None or dtypes.get(name, digest.dtypes[name]) != digest.dtypes[name]:
        continue  # Not recorded, or restored as another dtype: nothing to compare against.
      if int(want) != got:
        raise CheckpointIntegrityError(
            f'Checkpoint {step_dir} failed its integrity check: array {name} has checksum '
            f'{got:#010x} but {int(want):#010x} was recorded when it was saved (its files changed '
            f'after the save). {_fallback_hint(step_dir)}')
  if digest.nonfinite:
    raise CheckpointIntegrityError(
        f'Checkpoint {step_dir} failed its integrity check: array {digest.nonfinite[0]} holds NaN '
        f'or Inf (saved from a diverged run; {len(digest.nonfinite)} such array(s)). '
        f'{_fallback_hint(step_dir)}')


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
      CheckpointWriteError: `workdir/checkpoints` cannot be created or written.
    """
    if keep < 1:
      raise ValueError(f'keep={keep}: keep at least the latest checkpoint (keep >= 1); use '
                       'keep_every_steps to keep more forever.')
    if keep_every_steps < 0 or save_every_steps < 0:
      raise ValueError(f'keep_every_steps={keep_every_steps} and save_every_steps='
                       f'{save_every_steps} must be >= 0 (0 turns them off).')
    self.directory = _absolute(workdir) / CHECKPOINTS_DIR
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
        step_name_format=_CommittedNameFormat(),
        preservation_policy=ocp.checkpoint_managers.AnyPreservationPolicy(preserve),
        save_decision_policy=ocp.checkpoint_managers.AnySavePolicy(save_policies),
        enable_async_checkpointing=async_save,
        # Synchronous mkdirs: a directory that cannot be created fails `save` at once, instead of
        # leaving orbax's writer threads waiting 300 s for a signal (see the module docstring).
        async_options=ocp.AsyncOptions(create_directories_asynchronously=False),
        create=True,
    )
    self._manager = ocp.CheckpointManager(
        self.directory, item_names=(STATE_ITEM, CONFIG_ITEM, META_ITEM), options=options)

  def check_writable(self) -> None:
    """Creates `workdir/checkpoints` and writes and removes a probe file in it.

    Raises:
      CheckpointWriteError: naming the directory and the OS error.
    """
    probe = self.directory / f'.write-probe-{jax.process_index()}-{os.getpid()}'
    try:
      self.directory.mkdir(parents=True, exist_ok=True)
      probe.write_text('probe')
      probe.unlink()
    except Exception as e:  # pylint: disable=broad-exception-caught  (gfile raises its own types)
      raise CheckpointWriteError(
          f'Checkpoint directory {self.directory} is not writable: {_os_error_text(e)}; pass a '
          '--workdir on a writable disk.') from e

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
      CheckpointSaveError: this save (or the previous background one) failed.
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
    if _is_local(step_dir) and step_dir.exists() and not _is_committed(step_dir):
      raise ValueError(
          f'Cannot save step {step}: {step_dir} exists but is not a complete checkpoint (no '
          f'{COMMIT_MARKER}; a save that was cut off). Check it, then move it aside or delete it '
          '(Checkpointer.report_incomplete() moves such directories aside), and rerun.')
    digest = _digest(state)
    if digest.nonfinite:
      logging.warning('Saving step %d with NaN/Inf in %s (and %d more array(s)): restoring it will '
                      'fail its integrity check.', step, digest.nonfinite[0],
                      len(digest.nonfinite) - 1)
    meta = {'format': META_FORMAT, 'checksums': digest.checksums, 'dtypes': digest.dtypes,
            'extra': json.loads(json.dumps(extra or {}, default=str))}
    items = {STATE_ITEM: ocp.args.StandardSave(state), META_ITEM: ocp.args.JsonSave(meta)}
    if config is not None:
      items[CONFIG_ITEM] = ocp.args.JsonSave(_config_to_dict(config))
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

  def _save_error(self, step: int, cause: BaseException) -> CheckpointSaveError:
    last = (f'the last complete checkpoint (step {self._last_good})' if self._last_good is not None
            else 'no earlier checkpoint exists, and nothing')
    return CheckpointSaveError(
        f'Saving checkpoint {self.directory / str(step)} failed: {_os_error_text(cause)}; '
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
                        _os_error_text(e))

  def __enter__(self) -> Checkpointer:
    return self

  def __exit__(self, exc_type, *exc_info) -> None:
    if exc_type is None:
      self.close()
      return
    try:  # An error is already on its way out: report a failed save, but do not replace it.
      self.close()
    except CheckpointSaveError as e:
      logging.error('%s', e)

  # Listing ---------------------------------------------------------------------------------------

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
    for path in _incomplete_step_dirs(self.directory):
      if saving and _TMP_RE.match(path.name):
        continue  # Our own save in flight.
      step = int(re.match(r'\d+', path.name).group())
      self._warned.add(str(path))
      found.append((path, step, _aside_path(path, step, taken) if _is_local(path) else None))
    _sync_processes('cjepa_checkpoint_report_incomplete_listed')
    for path, step, target in found:
      if jax.process_index() != 0:
        continue
      if target is None:
        logging.warning(
            'Incomplete checkpoint directory %s (a save of step %d that was cut off: no %s); '
            'training resumes from %s and orbax replaces it when step %d is saved again.',
            path, step, COMMIT_MARKER, latest, step)
      else:
        path.rename(target)
        logging.warning(
            'Incomplete checkpoint directory %s (a save of step %d that was cut off: no %s): '
            'moved aside to %s so that step %d can be saved again; training resumes from %s. '
            'Nothing is deleted: remove %s once you have checked it.',
            path, step, COMMIT_MARKER, target, step, latest, target)
    _sync_processes('cjepa_checkpoint_report_incomplete_moved')
    return [str(target) for _, _, target in found if target is not None]

  # Restoring -------------------------------------------------------------------------------------

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
      CheckpointIntegrityError: an array differs from its checksum recorded at save time, or
        holds NaN/Inf; the message names the step directory and the array.
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
    state = restored[STATE_ITEM]
    _verify(step_dir, state)
    return state

  def restore_latest(self, abstract_state: Any) -> tuple[int | None, Any]:
    """Restores the newest complete checkpoint that reads and verifies: `(step, state)`.

    A newer one that fails (`CheckpointRestoreError`, integrity included) is reported with a
    warning naming it and why, and skipped; nothing is deleted. `(None, None)` when there is no
    complete checkpoint.

    Raises:
      CheckpointRestoreError: every complete checkpoint failed; the message lists them.
    """
    target = _abstract_target(abstract_state)
    self.latest_step()  # Warns about cut-off saves.
    failures = []
    failed_steps = []
    for step in reversed(self.all_steps()):
      step_dir = self.directory / str(step)
      try:
        state = self.restore(step, target)
      except CheckpointRestoreError as e:
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
    raise CheckpointRestoreError(
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
    moves = [(p, s, _aside_path(p, s, taken, 'damaged') if _is_local(p) else None)
             for p, s in moves]
    _sync_processes('cjepa_checkpoint_damaged_listed')
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
    _sync_processes('cjepa_checkpoint_damaged_moved')
    self._manager.reload()  # Forget the moved steps.

  def restore_config(self, step: int | None = None) -> dict[str, Any]:
    """The config saved with `step` (None: latest) as a plain dict (tuples come back as lists)."""
    _, step_dir = self._step_dir(step)
    return load_config(str(step_dir))

  def restore_extra(self, step: int | None = None) -> dict[str, Any]:
    """The `extra` dict saved with `step` (None: latest); {} for checkpoints saved without one."""
    _, step_dir = self._step_dir(step)
    meta = _read_meta(step_dir)
    return dict((meta or {}).get('extra') or {})


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


def load_extra(path: str) -> dict[str, Any]:
  """The `extra` dict saved with a checkpoint (workdir or step dir, as `resolve_checkpoint`);
  {} when it has none. Reads only the small meta/ item, and opens no Checkpointer (no writes)."""
  root, step = resolve_checkpoint(path)
  meta = _read_meta(epath.Path(root) / str(step))
  return dict((meta or {}).get('extra') or {})


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

  Raises:
    CheckpointIntegrityError: a restored array differs from its recorded checksum, or is not
      finite.
    CheckpointRestoreError: the checkpoint could not be read.
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
  _verify(state_dir.parent, restored, prefix=keys)
  return restored


def load_init_from(path: str, state: dict[str, Any], shardings: dict[str, Any]
                   ) -> dict[str, Any]:
  """`config.init_from`: another run's (or a converted reference) weights, at step 0.

  Takes `params` (encoder, predictor, and projector when the checkpoint has one) and
  `target_params` from the checkpoint at `path` (a workdir or a step directory); everything else
  in `state` (step, optimizer moments, rng) stays fresh. Shapes must match the current config's
  models; the result is placed with `shardings` (the state's).
  """
  loaded_params = restore_subtree(path, ('params',))
  params = dict(state['params'])
  for name, tree in loaded_params.items():
    if name not in params:
      raise ValueError(f'config.init_from={path!r} has params[{name!r}], which this config does '
                       f'not build (it has {sorted(params)}).')
    params[name] = _place_like(tree, params[name], shardings['params'][name], f'params/{name}')
  out = dict(state, params=params)
  if 'target_params' in state:   # A run without EMA (use_ema=False) keeps no target copy.
    root, step = resolve_checkpoint(path)
    has_target = 'target_params' in ocp.PyTreeCheckpointHandler().metadata(
        epath.Path(root) / str(step) / STATE_ITEM).tree
    # From a run without EMA, the target starts as the online encoder (as a fresh run's does).
    loaded_target = (restore_subtree(path, ('target_params',)) if has_target
                     else loaded_params['encoder'])
    out['target_params'] = _place_like(loaded_target, state['target_params'],
                                       shardings['target_params'], 'target_params')
  logging.info('Initialised %s%s from %s.', sorted(loaded_params),
               ' and target_params' if 'target_params' in state else '', path)
  return out


def _place_like(tree: Any, like: Any, shardings: Any, name: str) -> Any:
  """`tree` placed with `shardings`, after checking it has `like`'s structure and shapes."""
  mismatch = jepa.tree_mismatch(tree, like)
  if mismatch is not None and mismatch.path is None:
    raise ValueError(f'The init_from checkpoint\'s {name} does not have the structure of this '
                     "config's model: check model.variant, model.depth, model.pred_depth and "
                     'model.scan against the checkpoint (its config.json).')
  if mismatch is not None:
    raise ValueError(f'init_from: {name}{mismatch.path} has shape {mismatch.got} in the '
                     f'checkpoint but {mismatch.want} in this model.')
  return jax.tree.map(lambda x, ref, s: jax.device_put(jnp.asarray(x, ref.dtype), s),
                      tree, like, shardings)
