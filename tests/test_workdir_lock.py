"""The workdir lock (cjepa_jax/workdir_lock.py): exclusive, leased, taken over only when stale.

The two-process cases (a second real trainer refused in seconds, a lock left by a SIGKILLed
trainer taken over) are in tests/test_train.py.
"""

import json
import logging
import os
import socket
import subprocess
import sys
import time

import pytest

from cjepa_jax import workdir_lock


def _write_holder(workdir, *, host, pid, age_s=0.0, lease_s=workdir_lock.LEASE_S, token='old',
                  **extra):
  """A lock file as another trainer would have left it, its last heartbeat `age_s` ago."""
  path = workdir / workdir_lock.LOCK_FILE
  workdir.mkdir(parents=True, exist_ok=True)
  # pylint: disable-next=protected-access
  here = {'boot_id': workdir_lock._boot_id()} if host == socket.gethostname() else {}
  path.write_text(json.dumps({'format': 1, 'host': host, 'pid': pid, 'token': token,
                              'started': '2026-12-01T00:00:00+00:00', 'lease_s': lease_s,
                              **here, **extra}))
  beat = time.time() - age_s
  os.utime(path, (beat, beat))
  return path


def _dead_pid() -> int:
  proc = subprocess.Popen([sys.executable, '-c', 'pass'])
  proc.wait()
  return proc.pid


def test_lock_is_exclusive_and_names_its_holder(tmp_path):
  workdir = tmp_path / 'run'
  with workdir_lock.WorkdirLock(str(workdir)) as lock:
    holder = json.loads((workdir / 'trainer.lock').read_text())
    assert holder['host'] == socket.gethostname() and holder['pid'] == os.getpid()
    assert holder['token'] == lock.token and holder['lease_s'] == workdir_lock.LEASE_S
    assert not list(workdir.glob('trainer.lock.*')), 'no temporary file is left'
    with pytest.raises(workdir_lock.WorkdirLockedError) as info:
      workdir_lock.WorkdirLock(str(workdir)).acquire()
    message = str(info.value)
    assert '\n' not in message and isinstance(info.value, ValueError)
    for part in (f'host {socket.gethostname()}', f'pid {os.getpid()}', holder['started'],
                 '--config.force_unlock=True', 'Wait for it'):
      assert part in message, (part, message)
    with pytest.raises(workdir_lock.WorkdirLockedError):
      workdir_lock.check_free(str(workdir))
    lock.check()   # Still ours.
  assert not (workdir / 'trainer.lock').exists(), 'released on exit'
  workdir_lock.check_free(str(workdir))


def test_lock_is_released_when_the_block_raises(tmp_path):
  with pytest.raises(RuntimeError):
    with workdir_lock.WorkdirLock(str(tmp_path)):
      raise RuntimeError('boom')
  assert not (tmp_path / 'trainer.lock').exists()


def test_dead_pid_on_this_host_is_taken_over_at_once(tmp_path, caplog):
  pid = _dead_pid()
  _write_holder(tmp_path, host=socket.gethostname(), pid=pid)
  workdir_lock.check_free(str(tmp_path))   # Stale: not refused.
  caplog.set_level(logging.WARNING)
  with workdir_lock.WorkdirLock(str(tmp_path)) as lock:
    assert json.loads((tmp_path / 'trainer.lock').read_text())['token'] == lock.token
  assert f'pid {pid}' in caplog.text and f'its process {pid} is not running' in caplog.text


def test_reused_pid_and_another_machine_of_this_hostname(tmp_path):
  """A live pid that started after the holder's record is a reused pid: stale at once. A holder
  on another machine with this hostname (another boot id) is judged by its lease alone."""
  # pylint: disable=protected-access
  if workdir_lock._start_ticks(os.getpid()) is None:
    pytest.skip('no /proc here')
  _write_holder(tmp_path, host=socket.gethostname(), pid=os.getpid(), pid_start='1')
  with workdir_lock.WorkdirLock(str(tmp_path)):
    pass
  _write_holder(tmp_path, host=socket.gethostname(), pid=_dead_pid(), boot_id='another-boot')
  with pytest.raises(workdir_lock.WorkdirLockedError):
    workdir_lock.WorkdirLock(str(tmp_path)).acquire()


def test_unwritable_workdir_is_one_line(tmp_path):
  blocker = tmp_path / 'file'
  blocker.write_text('not a directory')
  with pytest.raises(workdir_lock.WorkdirNotWritableError, match=r'Workdir .*/file/run is not '
                     r'writable: \[Errno 20\] Not a directory') as info:
    workdir_lock.WorkdirLock(str(blocker / 'run')).acquire()
  assert isinstance(info.value, ValueError) and '\n' not in str(info.value)


def test_other_host_is_live_until_its_lease_expires(tmp_path, caplog):
  _write_holder(tmp_path, host='node-7', pid=4242, age_s=30)
  with pytest.raises(workdir_lock.WorkdirLockedError, match=r'host node-7, pid 4242.*lease '
                     r'expires in \d+ s'):
    workdir_lock.WorkdirLock(str(tmp_path)).acquire()
  _write_holder(tmp_path, host='node-7', pid=4242, age_s=workdir_lock.LEASE_S + 5)
  caplog.set_level(logging.WARNING)
  with workdir_lock.WorkdirLock(str(tmp_path)):
    pass
  assert 'node-7' in caplog.text and 'lease expired' in caplog.text


def test_an_unreadable_lock_file_counts_as_live_until_its_lease(tmp_path):
  path = tmp_path / 'trainer.lock'
  path.write_text('not json')
  with pytest.raises(workdir_lock.WorkdirLockedError):
    workdir_lock.WorkdirLock(str(tmp_path)).acquire()
  old = time.time() - workdir_lock.LEASE_S - 1
  os.utime(path, (old, old))
  with workdir_lock.WorkdirLock(str(tmp_path)):
    pass


def test_heartbeat_renews_the_lease(tmp_path):
  with workdir_lock.WorkdirLock(str(tmp_path), heartbeat_s=0.05):
    path = tmp_path / 'trainer.lock'
    old = time.time() - 100
    os.utime(path, (old, old))
    deadline = time.time() + 10
    while path.stat().st_mtime < time.time() - 50 and time.time() < deadline:
      time.sleep(0.05)
    assert path.stat().st_mtime > time.time() - 50


def test_force_takes_a_live_lock_and_the_old_holder_stops(tmp_path, caplog):
  first = workdir_lock.WorkdirLock(str(tmp_path), heartbeat_s=3600).acquire()
  caplog.set_level(logging.WARNING)
  second = workdir_lock.WorkdirLock(str(tmp_path), force=True).acquire()
  assert 'forced (--config.force_unlock=True)' in caplog.text
  first.refresh()   # Its next heartbeat notices.
  with pytest.raises(workdir_lock.WorkdirLockLostError, match='took over'):
    first.check()
  first.release()   # Does not remove the new holder's lock.
  assert json.loads((tmp_path / 'trainer.lock').read_text())['token'] == second.token
  second.release()
  assert not (tmp_path / 'trainer.lock').exists()


def test_disabled_lock_writes_nothing(tmp_path):
  with workdir_lock.WorkdirLock(str(tmp_path / 'run'), enabled=False) as lock:
    lock.check()
  assert not (tmp_path / 'run').exists()
