"""Preemption: SIGTERM / SIGINT become "finish this step, save it, exit with code 75".

Spot / preemptible TPU VMs, SLURM (a requeue, `scancel`, a time limit) and Kubernetes all send
SIGTERM some seconds before they kill a job. The trainer asks `Preemption.reached(step)` after
every step; once it says True, every process holds the state of the same `step`, saves a checkpoint
of it and exits with `EXIT_CODE`, which the launch scripts read as "saved, requeue me".

One process: Python handlers for SIGTERM and SIGINT set a flag; the step in flight finishes, and
`reached` is True from the next check on.

Several processes (after `jax.distributed.initialize`): the processes must agree on the step, since
the save is collective. JAX's preemption sync manager does that: its notifier (installed by
`jax.distributed.initialize`) catches SIGTERM on any process and tells the coordination service,
which picks the first step every process has yet to reach; `multihost_utils.
reached_preemption_sync_point(step)` is True at that step on every process. SIGTERM is therefore
left to JAX's notifier here, and SIGINT is forwarded to it as a SIGTERM.

The same signal a second time restores the default behaviour, so a second Ctrl-C stops at once.
"""

from __future__ import annotations

import signal
import types
from typing import Any

from absl import logging
import jax
from jax.experimental import multihost_utils

# EX_TEMPFAIL (sysexits.h): "temporary failure, retry" -- the run saved its state and should be
# started again with the same --workdir. launch/*.sh requeue on it.
EXIT_CODE = 75


class Preempted(Exception):
  """SIGTERM / SIGINT: the state of `step` was checkpointed; the CLI exits with `EXIT_CODE`."""

  def __init__(self, step: int):
    super().__init__(f'preempted at step {step}; its checkpoint is saved')
    self.step = step


def _sync_manager_available() -> bool:
  from jax._src import distributed as jax_distributed  # pylint: disable=g-import-not-at-top
  return jax_distributed.global_state.preemption_sync_manager is not None


class Preemption:
  """Watches for SIGTERM / SIGINT during training (use as a context manager around the loop)."""

  def __init__(self):
    self._multi = jax.process_count() > 1 and _sync_manager_available()
    self.signal_name: str | None = None
    self._previous: dict[int, Any] = {}

  def _handle(self, signum: int, frame: types.FrameType | None) -> None:
    del frame
    name = signal.Signals(signum).name
    if self.signal_name == name:  # The same signal again (Ctrl-C twice): stop now.
      self._restore()
      signal.raise_signal(signum)
      return
    if self.signal_name is not None:
      return  # Already stopping (e.g. SIGTERM after Ctrl-C from a launcher's trap).
    self.signal_name = name
    # Only note it here (a signal handler should do little); the loop logs and saves.
    if self._multi:
      signal.raise_signal(signal.SIGTERM)  # SIGINT -> JAX's SIGTERM notifier (see module doc).

  def __enter__(self) -> Preemption:
    signals = (signal.SIGINT,) if self._multi else (signal.SIGTERM, signal.SIGINT)
    for s in signals:
      self._previous[s] = signal.signal(s, self._handle)
    return self

  def _restore(self) -> None:
    for s, handler in self._previous.items():
      signal.signal(s, handler)
    self._previous = {}

  def __exit__(self, *exc_info) -> None:
    self._restore()

  def reached(self, step: int) -> bool:
    """Whether to save `step` and stop. Call it after every step, on every process."""
    if self._multi:
      if multihost_utils.reached_preemption_sync_point(step):
        self.signal_name = self.signal_name or 'SIGTERM'
        return True
      return False
    return self.signal_name is not None

  def log_stop(self, step: int, saved: bool, directory: str) -> None:
    what = f'saved the checkpoint of step {step} in {directory}' if saved else (
        f'step {step} already had a checkpoint in {directory}')
    logging.warning('%s received (process %d): %s; exiting with code %d. Start the same command '
                    'again to resume from step %d.', self.signal_name, jax.process_index(), what,
                    EXIT_CODE, step)

