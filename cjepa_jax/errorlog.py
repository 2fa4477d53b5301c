"""Library tracebacks go to a file in the workdir; the console keeps the project's own lines.

A failed save (disk full) or the restore of a damaged checkpoint makes orbax and tensorstore log
a traceback per array and writer thread, and leaves callbacks aimed at orbax's closed event loop
("RuntimeError: Event loop is closed", reported through `sys.unraisablehook`): hundreds of lines
around the project's one-line message, which already names the step directory, the OS error and
the fix. `divert_library_errors(workdir)` (the entry points call it after the flag checks) sends
them to `WORKDIR/errors.log` instead:

  * absl log records of library code (orbax, etils, tensorstore, asyncio, tensorflow_datasets) at
    level ERROR or above, or carrying a traceback, are written to the file and kept off the
    console;
  * unraisable exceptions (`sys.unraisablehook`) are written to the file.

The first diverted record logs one console warning naming the file; the CLIs append the file to
their one-line error (`cli.run`). With `--verbosity=1` nothing is diverted (everything stays on the
console, as before). When the workdir does not exist or cannot be written (the disk is full), the
file is `<tempdir>/cjepa-errors-<pid>.log`. Library warnings without a traceback stay on the
console.

Nothing here runs at import; the hooks are installed once per process.
"""

from __future__ import annotations

import datetime
import logging as py_logging
import os
import sys
import tempfile
import traceback
from typing import Any, TextIO

from absl import logging

ERRORS_FILE = 'errors.log'
# Where library records come from (absl reports every module's records with its file path).
_LIBRARY_PATHS = ('/orbax/', '/etils/', '/tensorstore/', '/asyncio/', '/tensorflow_datasets/',
                  '/concurrent/futures/')


class _Diverter(py_logging.Filter):
  """The absl handler's filter that diverts library errors (and owns the file and the hook)."""

  def __init__(self, workdir: str):
    super().__init__()
    self.workdir = workdir
    self.path: str | None = None
    self.count = 0
    self._file: TextIO | None = None
    self._failed: set[str] = set()   # Files that could not be opened or written.
    self._previous_unraisable = sys.unraisablehook

  # The file ----------------------------------------------------------------------------------

  def _open(self) -> TextIO | None:
    """The file, opened on first use: the workdir's, else the temporary one; None if neither."""
    if self._file is not None:
      return self._file
    candidates = [os.path.join(tempfile.gettempdir(), f'cjepa-errors-{os.getpid()}.log')]
    if os.path.isdir(self.workdir):   # Never create the workdir from an error path.
      candidates.insert(0, os.path.join(self.workdir, ERRORS_FILE))
    for path in candidates:
      if path in self._failed:
        continue
      try:
        self._file = open(path, 'a', encoding='utf-8')   # pylint: disable=consider-using-with
        self.path = path
        return self._file
      except OSError:
        self._failed.add(path)
    return None

  def _write(self, text: str) -> bool:
    """Appends `text` to the file; False if no file could be written (then: the console)."""
    while (f := self._open()) is not None:
      try:
        f.write(text if text.endswith('\n') else text + '\n')
        f.flush()
        break
      except OSError:   # E.g. the disk filled up: try the next file.
        self._failed.add(self.path)
        self._file = None
    else:
      return False
    if self.count == 0:
      logging.warning('Library tracebacks of this failure go to %s (--verbosity=1 shows them '
                      'here).', self.path)
    self.count += 1
    return True

  # The hooks ---------------------------------------------------------------------------------

  def filter(self, record: py_logging.LogRecord) -> bool:
    if logging.get_verbosity() >= 1:
      return True
    if not any(p in record.pathname for p in _LIBRARY_PATHS):
      return True
    if record.levelno < py_logging.ERROR and not record.exc_info:
      return True
    stamp = datetime.datetime.fromtimestamp(record.created).isoformat(timespec='milliseconds')
    text = f'{stamp} {record.levelname} {record.pathname}:{record.lineno}] {record.getMessage()}'
    if record.exc_info:
      text += '\n' + ''.join(traceback.format_exception(*record.exc_info))
    return not self._write(text)

  def unraisable(self, unraisable: Any) -> None:
    if logging.get_verbosity() >= 1:
      self._previous_unraisable(unraisable)
      return
    head = unraisable.err_msg or 'Exception ignored in'
    text = f'{head}: {unraisable.object!r}\n' + ''.join(traceback.format_exception(
        unraisable.exc_type, unraisable.exc_value, unraisable.exc_traceback))
    if not self._write(text):
      self._previous_unraisable(unraisable)


def _installed() -> _Diverter | None:
  for f in logging.get_absl_handler().filters:
    if isinstance(f, _Diverter):
      return f
  return None


def divert_library_errors(workdir: str) -> None:
  """Sends library tracebacks to `workdir/errors.log` from now on (see the module docstring)."""
  if _installed() is not None:
    return
  diverter = _Diverter(workdir)
  logging.get_absl_handler().addFilter(diverter)
  sys.unraisablehook = diverter.unraisable


def diverted_to() -> str | None:
  """The file that library tracebacks went to in this process, or None if none was diverted."""
  diverter = _installed()
  return diverter.path if diverter is not None and diverter.count else None
