"""One trainer per workdir: an exclusive lock file with a lease, safe on shared file systems.

A SLURM requeue that overlaps the old job, or a double launch, would otherwise run two trainers
on one workdir: their saves race, `metrics.jsonl` interleaves, and with different seeds or code
the checkpoints mix two runs. Both trainers (`cjepa-train`, `cjepa-finetune`) therefore hold
`WORKDIR/trainer.lock` from before they write anything until they exit (normally, with an error,
or with code 75 on preemption). One lock per job: process 0 takes it for a multi-process job.

The file: one JSON object, `{"format": 1, "host", "pid", "boot_id" and "pid_start" (Linux: the
machine's boot and the process's start time, which tell apart two machines of one hostname and a
reused pid), "started" (UTC, ISO 8601), "token" (a random id of this holder), "lease_s",
"heartbeat_s", "command"}`. It is written whole to a
temporary file beside it and then hard-linked to `trainer.lock`: `link` fails with EEXIST when the
lock exists (atomic and exclusive on POSIX file systems and NFS, where O_EXCL was not always),
and a reader never sees a half-written holder.

The lease: the holder's heartbeat thread touches the file (its mtime) every `heartbeat_s`
seconds; the lock is live while `now - mtime < lease_s` (default 120 s, six heartbeats: NFS
attribute caches and clock skew are far smaller). A lock is taken over, with a warning naming the
old holder, only when it is stale:
  * its holder is on this machine (hostname and boot id) and its process is gone (a SIGKILLed or
    crashed trainer; a pid now running another process counts as gone): at once;
  * or its lease has expired (a dead host, a job killed elsewhere): nothing refreshed it for
    `lease_s`.
Otherwise `WorkdirLockedError` (a ValueError, so one line from the CLIs) names the holder and what
to do: wait, or `--config.force_unlock=True` after checking that the holder is gone. A forced
take-over is noticed by the old holder at its next heartbeat; its `check()` (the trainers call it
every step) then stops it with `WorkdirLockLostError` before its next save.

Take-over: the stale file is renamed to a unique name (only one contender's rename succeeds),
its token compared with the one judged stale (if a fresh lock slipped in meanwhile, it is linked
back and this start fails as locked), then the new lock is linked as above.

Readers (the probe, exports, `cjepa-finetune --config.pretrained=WORKDIR`) take no lock: they
only use checkpoints whose commit marker exists (checkpoint/layout.py), so they never see a half-written
step. Workdirs on object stores (gs://) are not locked: they have no atomic link; the lock is
skipped with a warning.

`remove_if_empty(workdir)` takes away the workdir a failed first start created (the lock's
directory) and left empty.

Nothing here runs at import.
"""

from __future__ import annotations

import datetime
import errno
import json
import os
import shutil
import socket
import sys
import threading
import time
import uuid
from typing import Any

from absl import logging

LOCK_FILE = 'trainer.lock'
FORMAT = 1
LEASE_S = 120.0       # A lock whose heartbeat is older than this is stale.
HEARTBEAT_S = 20.0    # How often the holder refreshes it.


class WorkdirLockedError(ValueError):
  """Another live trainer holds the workdir's lock (the message names it and what to do)."""


class WorkdirNotWritableError(ValueError):
  """The workdir (or its lock file) cannot be created: one line naming the path and OS error."""


class WorkdirLockLostError(RuntimeError):
  """This trainer's lock was taken over (`force_unlock` elsewhere): it must stop writing."""


def lock_path(workdir: str) -> str:
  return os.path.join(workdir, LOCK_FILE)


def _is_local(workdir: str) -> bool:
  return '://' not in str(workdir)


def read_holder(path: str) -> dict[str, Any] | None:
  """The holder recorded in the lock file at `path` (plus its `mtime`), or None if there is none.

  A file that is not a JSON object (written by something else, or damaged) reads as an unknown
  holder on an unknown host, so that only its lease can make it stale.
  """
  try:
    with open(path, encoding='utf-8') as f:
      text = f.read()
    mtime = os.stat(path).st_mtime
  except FileNotFoundError:
    return None
  try:
    holder = json.loads(text)
    if not isinstance(holder, dict):
      raise ValueError(text)
  except ValueError:
    holder = {'host': '?', 'pid': -1, 'started': '?', 'token': None}
  holder['mtime'] = mtime
  return holder


def _boot_id() -> str | None:
  """This machine's boot id (Linux), which tells two machines of one hostname apart."""
  try:
    with open('/proc/sys/kernel/random/boot_id', encoding='ascii') as f:
      return f.read().strip()
  except OSError:
    return None


def _proc_stat(pid: int) -> list[str] | None:
  """Fields 3... of /proc/<pid>/stat (Linux): [state, ppid, ...]; None where there is none."""
  try:
    with open(f'/proc/{pid}/stat', encoding='ascii', errors='replace') as f:
      return f.read().rsplit(')', 1)[1].split()
  except OSError:
    return None


def _start_ticks(pid: int) -> str | None:
  """When process `pid` started (Linux, clock ticks since boot), which tells a reused pid apart."""
  fields = _proc_stat(pid)
  return fields[19] if fields and len(fields) > 19 else None   # Field 22 of the stat line.


def _pid_running(pid: int) -> bool:
  """Whether `pid` runs on this machine (a zombie, killed but not yet reaped, does not)."""
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:   # Exists, owned by someone else.
    pass
  fields = _proc_stat(pid)
  return not (fields and fields[0] == 'Z')


def stale_reason(holder: dict[str, Any], now: float | None = None) -> str | None:
  """Why `holder`'s lock may be taken over, or None while it is live."""
  now = time.time() if now is None else now
  age = now - float(holder['mtime'])
  pid = holder.get('pid')
  # The same machine: the same hostname and boot (containers and pods may share a hostname).
  here = holder.get('host') == socket.gethostname() and holder.get('boot_id') == _boot_id()
  if here and isinstance(pid, int) and pid > 0:
    if not _pid_running(pid):
      return f'its process {pid} is not running on this host'
    started = _start_ticks(pid)
    if holder.get('pid_start') and started and started != holder['pid_start']:
      return f'its process {pid} has exited (the pid now belongs to another process)'
  lease = float(holder.get('lease_s') or LEASE_S)
  if age >= lease:
    return f'its lease expired (last heartbeat {age:.0f} s ago, lease {lease:.0f} s)'
  return None


def describe(holder: dict[str, Any], now: float | None = None) -> str:
  """`host H, pid P, started S, last heartbeat N s ago`."""
  now = time.time() if now is None else now
  return (f"host {holder.get('host')}, pid {holder.get('pid')}, started {holder.get('started')}, "
          f"last heartbeat {max(now - float(holder['mtime']), 0):.0f} s ago")


def _locked_error(workdir: str, holder: dict[str, Any]) -> WorkdirLockedError:
  now = time.time()
  lease = float(holder.get('lease_s') or LEASE_S)
  left = max(lease - (now - float(holder['mtime'])), 0)
  return WorkdirLockedError(
      f'{workdir} is in use by another trainer ({describe(holder, now)}): two trainers on one '
      f'workdir would mix their checkpoints and metrics. Wait for it to finish (if it died '
      f'elsewhere, its lease expires in {left:.0f} s), or, after checking that it is gone, add '
      f'--config.force_unlock=True (the lock is {lock_path(workdir)}).')


def check_free(workdir: str, force: bool = False) -> None:
  """Fails at once (before any slow start-up work) if a live trainer holds `workdir`'s lock.

  Reads only; `WorkdirLock.acquire` takes the lock later (and checks again, atomically).

  Raises:
    WorkdirLockedError: naming the holder and what to do.
  """
  if force or not _is_local(workdir):
    return
  holder = read_holder(lock_path(workdir))
  if holder is not None and stale_reason(holder) is None:
    raise _locked_error(workdir, holder)


class WorkdirLock:
  """The exclusive lock of a trainer on its workdir (see the module docstring).

    with WorkdirLock(workdir, force=config.force_unlock) as lock:   # Creates the workdir.
      ... lock.check() every step ...

  `enabled=False` (the processes other than 0) makes every method a no-op.
  """

  def __init__(self, workdir: str, *, force: bool = False, enabled: bool = True,
               lease_s: float = LEASE_S, heartbeat_s: float = HEARTBEAT_S):
    self.workdir = workdir
    self.path = lock_path(workdir)
    self.force = force
    self.enabled = enabled and _is_local(workdir)
    self.lease_s, self.heartbeat_s = float(lease_s), float(heartbeat_s)
    self.token = uuid.uuid4().hex
    self._held = False
    self._lost: str | None = None
    self._stop = threading.Event()
    self._thread: threading.Thread | None = None
    if enabled and not self.enabled:
      logging.warning('%s is on an object store: no workdir lock (two trainers there would not be '
                      'stopped).', workdir)

  def _holder_record(self) -> dict[str, Any]:
    started = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds')
    return {'format': FORMAT, 'host': socket.gethostname(), 'pid': os.getpid(),
            'boot_id': _boot_id(), 'pid_start': _start_ticks(os.getpid()),
            'started': started, 'token': self.token, 'lease_s': self.lease_s,
            'heartbeat_s': self.heartbeat_s, 'command': ' '.join(sys.argv)[:2000]}

  def _link_new(self) -> bool:
    """Creates the lock with this holder's record; False if a lock exists."""
    tmp = f'{self.path}.{self.token}.tmp'
    with open(tmp, 'w', encoding='utf-8') as f:
      json.dump(self._holder_record(), f)
      f.flush()
      os.fsync(f.fileno())
    try:
      os.link(tmp, self.path)
      return True
    except FileExistsError:
      return False
    finally:
      os.unlink(tmp)

  def _create(self) -> bool:
    """`_link_new` in a workdir created if needed; OS errors become WorkdirNotWritableError."""
    try:
      os.makedirs(self.workdir, exist_ok=True)
      return self._link_new()
    except OSError as e:
      raise WorkdirNotWritableError(
          f'Workdir {self.workdir} is not writable: {e}; pass a --workdir on a writable disk.'
      ) from None

  def _take_over(self, holder: dict[str, Any], why: str) -> bool:
    """Moves `holder`'s lock aside and links ours; False if another start was quicker."""
    aside = f'{self.path}.{self.token}.old'
    try:
      os.rename(self.path, aside)
    except FileNotFoundError:
      return self._link_new()   # Removed meanwhile (its holder released it).
    moved = read_holder(aside) or {}
    if moved.get('token') != holder.get('token'):
      # A fresh lock slipped in between our read and the rename: give it back.
      try:
        os.link(aside, self.path)
      except FileExistsError:
        pass
      os.unlink(aside)
      return False
    os.unlink(aside)
    logging.warning('Took over the lock of %s from %s: %s.', self.workdir, describe(holder), why)
    return self._link_new()

  def acquire(self) -> WorkdirLock:
    """Creates the workdir if needed and takes its lock.

    Raises:
      WorkdirLockedError: a live trainer holds it (and `force` is off).
      WorkdirNotWritableError: the workdir or the lock file cannot be created.
    """
    if not self.enabled:
      return self
    for _ in range(5):   # Each retry follows another start's move; a few at most.
      if self._create():
        break
      holder = read_holder(self.path)
      if holder is None:
        continue   # Released meanwhile.
      why = stale_reason(holder)
      if why is None and self.force:
        why = 'forced (--config.force_unlock=True)'
      if why is None:
        raise _locked_error(self.workdir, holder)
      if self._take_over(holder, why):
        break
    else:
      raise WorkdirLockedError(f'Could not take the lock {self.path}: other trainers keep taking '
                               'it. Start one trainer per workdir.')
    self._held = True
    self._thread = threading.Thread(target=self._heartbeat, name='cjepa-workdir-lock',
                                    daemon=True)
    self._thread.start()
    return self

  def _heartbeat(self) -> None:
    while not self._stop.wait(self.heartbeat_s):
      self.refresh()

  def refresh(self) -> None:
    """Renews the lease (the file's mtime), after checking that the lock is still ours."""
    holder = read_holder(self.path)
    if holder is None or holder.get('token') != self.token:
      if self._lost is None:
        taker = describe(holder) if holder else 'nobody (the file was removed)'
        self._lost = f'the lock {self.path} is now held by {taker}'
        logging.error('Lost the workdir lock: %s.', self._lost)
      return
    try:
      os.utime(self.path)
    except OSError as e:   # A transient error of a shared file system: the next beat retries.
      logging.warning('Could not refresh the workdir lock %s: %s', self.path, e)

  def check(self) -> None:
    """Raises WorkdirLockLostError once another trainer took the lock over. Cheap: a flag."""
    if self._lost is not None:
      raise WorkdirLockLostError(
          f'Another trainer took over {self.workdir} (--config.force_unlock=True): {self._lost}. '
          'This trainer stops without saving again; its earlier checkpoints are kept.')

  def release(self) -> None:
    """Stops the heartbeat and removes the lock if it is still ours."""
    if not self._held:
      return
    self._held = False
    self._stop.set()
    if self._thread is not None:
      self._thread.join(timeout=5)
    holder = read_holder(self.path)
    if holder is not None and holder.get('token') == self.token:
      try:
        os.unlink(self.path)
      except OSError as e:
        if e.errno != errno.ENOENT:
          logging.warning('Could not remove the workdir lock %s: %s', self.path, e)

  def __enter__(self) -> WorkdirLock:
    return self.acquire()

  def __exit__(self, *exc_info) -> None:
    self.release()


def remove_if_empty(workdir: str) -> None:
  """Removes a workdir this start created when a failed start left nothing in it but empty dirs."""
  for root, dirs, files in os.walk(workdir):
    if files:
      return
    del root, dirs
  shutil.rmtree(workdir, ignore_errors=True)
