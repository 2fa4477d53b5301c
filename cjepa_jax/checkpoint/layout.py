"""The checkpoint directory on disk: its layout, and which steps are complete.

Layout: `WORKDIR/checkpoints/<step>/` holds one orbax step directory per saved step, with items:

  state/   The train state: a pytree (dicts, optax namedtuples) of jax.Arrays (step, params, EMA
           target params, optimizer state), written by `ocp.args.StandardSave` (OCDBT + zarr).
  config/  The run's config as JSON (`ConfigDict.to_json_best_effort`; tuples come back as lists).
  meta/    JSON: `{'format': 1, 'checksums': {name: int}, 'dtypes': {name: str}, 'extra': {...}}`
           (see `integrity`) and the trainer's small `extra` dict (e.g. `data_skipped`). Older
           checkpoints lack it.

Completeness. orbax 0.12.8 writes `<step>/commit_success.txt` when it finalizes a step, under both
of its atomicity protocols: atomic rename of `<step>.orbax-checkpoint-tmp[-<t>]/` on local/POSIX
file systems, commit file in place on GCS. A step counts here only when that marker exists, so a
save cut off mid-write (a leftover tmp directory, or a `<step>/` directory without the marker) is
never chosen over the previous complete one: orbax's own step listing on a local file system
accepts any directory named by an integer, so the manager gets a name format that also requires
the marker. `Checkpointer.report_incomplete()` (the trainer calls it at start-up) logs one warning
per such directory and renames it (process 0 only) to `<step>.incomplete-<UTC mtime>` beside it,
so that the run can save that step again later. Nothing is ever deleted here: a human decides.
"""

from __future__ import annotations

import dataclasses
import datetime
import os
import re
from typing import Any, Iterator

import jax
import orbax.checkpoint as ocp
from absl import logging
from etils import epath


CHECKPOINTS_DIR = 'checkpoints'
STATE_ITEM = 'state'
CONFIG_ITEM = 'config'
META_ITEM = 'meta'


# Written by orbax 0.12.8 on finalize under both atomicity protocols (see the module docstring).
COMMIT_MARKER = 'commit_success.txt'
STEP_RE = re.compile(r'^(0|[1-9]\d*)$')
TMP_RE = re.compile(r'^(0|[1-9]\d*)\.orbax-checkpoint-tmp')


@dataclasses.dataclass(frozen=True)
class CommittedNameFormat(ocp.step.NameFormat):
  """orbax's standard `<step>` naming, listing only steps whose commit marker exists."""

  base: Any = dataclasses.field(default_factory=ocp.step.standard_name_format)

  def build_name(self, step: int) -> str:
    return self.base.build_name(step)

  def find_all(self, base_path: epath.PathLike) -> Iterator[ocp.step.Metadata]:
    return (m for m in self.base.find_all(base_path) if is_committed(m.path))

  def find_step(self, base_path: epath.PathLike, step: int) -> ocp.step.Metadata:
    metadata = self.base.find_step(base_path, step)
    if not is_committed(metadata.path):
      raise ValueError(f'Checkpoint {metadata.path} is incomplete (no {COMMIT_MARKER}).')
    return metadata


def absolute(path: str) -> epath.Path:
  """Orbax wants absolute paths: a relative local path is taken from the current directory."""
  p = epath.Path(path)
  return p if '://' in str(path) else epath.Path(os.path.abspath(str(p)))


def is_local(path: epath.Path) -> bool:
  return '://' not in str(path)


def is_committed(step_dir: epath.Path) -> bool:
  return (step_dir / COMMIT_MARKER).exists()


def complete_steps(root: epath.Path) -> list[int]:
  """Sorted steps of the complete checkpoints directly under `root` (a `checkpoints/` dir)."""
  if not root.is_dir():
    return []
  return sorted(m.step for m in CommittedNameFormat().find_all(root))


def incomplete_step_dirs(root: epath.Path) -> list[epath.Path]:
  """Step-like directories under `root` that are not complete checkpoints (cut-off saves)."""
  if not root.is_dir():
    return []
  found = []
  for path in root.iterdir():
    if TMP_RE.match(path.name) or (STEP_RE.match(path.name) and path.is_dir()
                                    and not is_committed(path)):
      found.append(path)
  return sorted(found, key=lambda p: p.name)


def warn_incomplete(path: epath.Path, latest: int | None) -> None:
  fallback = f'step {latest}' if latest is not None else 'no checkpoint (a fresh start)'
  logging.warning(
      'Skipping incomplete checkpoint directory %s (a save that was cut off: no %s); using %s '
      'instead. Nothing is deleted automatically: remove that directory once you have checked it.',
      path, COMMIT_MARKER, fallback)


def aside_path(path: epath.Path, step: int, taken: set[str], tag: str = 'incomplete'
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


def sync_processes(name: str) -> None:
  """A barrier across all processes (none needed, and none taken, in a single process)."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    multihost_utils.sync_global_devices(name)
