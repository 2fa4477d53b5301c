"""The checkpoint errors, and the one-line texts they carry (what failed, and how to go on).

Every error is a ValueError, so the command lines print it as one line (`cli.USER_ERRORS`).
"""

from __future__ import annotations

from etils import epath

from cjepa_jax.checkpoint import layout


_MAX_CAUSE_CHARS = 600  # tensorstore errors carry a long JSON spec; keep the message readable.
_MAX_OS_ERROR_CHARS = 300


class CheckpointRestoreError(ValueError):
  """A checkpoint step could not be restored (damaged on disk, or a mismatched target)."""


class CheckpointIntegrityError(CheckpointRestoreError):
  """A restored array differs from its checksum recorded at save time, or is not finite."""


class CheckpointSaveError(ValueError):
  """A save failed (synchronously or in the background); earlier checkpoints are untouched."""


class CheckpointWriteError(ValueError):
  """`workdir/checkpoints` cannot be created or written."""


def one_line(text: str, limit: int) -> str:
  """`text` on one line (whitespace runs -> one space), cut at `limit` characters."""
  text = ' '.join(str(text).split())
  return text if len(text) <= limit else text[:limit] + ' ...'


def os_error_text(error: BaseException) -> str:
  """The OS-level cause of a failed write, without orbax's / tensorstore's wrapping.

  A Python OSError in the cause chain gives `[Errno 28] No space left on device: '/x'`. A
  tensorstore error is one long line of nested context ending in the OS error, e.g. `Error writing
  "w/0" in OCDBT database at local file "...": Failed writing: "...": Failed to write 258932 bytes
  to file 6: File too large [os_error_code='27']`: its last segment is kept.
  """
  seen, cause = set(), error
  while cause is not None and id(cause) not in seen:
    if isinstance(cause, OSError) and cause.errno is not None:
      return one_line(str(cause), _MAX_OS_ERROR_CHARS)
    seen.add(id(cause))
    cause = cause.__cause__ or cause.__context__
  text = one_line(str(error), 10 * _MAX_OS_ERROR_CHARS)
  if 'os_error_code' in text and '": ' in text:
    return one_line(text.rsplit('": ', 1)[-1], _MAX_OS_ERROR_CHARS)
  return one_line(f'{type(error).__name__}: {text}', _MAX_OS_ERROR_CHARS)


def restore_error(step_dir: epath.Path, cause: Exception) -> CheckpointRestoreError:
  """The error for an unreadable step directory: what failed, and how to fall back."""
  text = one_line(f'{type(cause).__name__}: {cause}', _MAX_CAUSE_CHARS)
  return CheckpointRestoreError(
      f'Could not restore checkpoint {step_dir}: {text}. {fallback_hint(step_dir)} If instead '
      'the target tree does not match what was saved (a different model or optimizer config), '
      'restore with the config the run was saved with (see its config/ item).')


def fallback_hint(step_dir: epath.Path) -> str:
  """How to get past a damaged step directory, naming the step that would be used instead."""
  earlier = [s for s in layout.complete_steps(step_dir.parent) if s < int(step_dir.name)]
  fallback = (f'the previous complete checkpoint (step {earlier[-1]})' if earlier
              else 'a fresh start (there is no earlier complete checkpoint)')
  return (f'If it is damaged, Checkpointer.restore_latest falls back by itself; by hand, move '
          f'{step_dir} aside (or delete {step_dir}) to fall back to {fallback}; checkpoints are '
          'never deleted automatically.')
