"""What a run keeps around its checkpoints, shared by the pretraining and fine-tuning trainers.

  locked(workdir, force)                      the trainer's workdir lock, held by process 0.
  save_config(config, workdir, start_step)    DIR/config.json, written once a start is good.
  check_resume_config(saved, config, ...)     refuses a resume that changes shapes or meaning.
  remove_if_empty(workdir)                    a failed first start leaves no empty workdir.
  check_finite(step, finite, last_good, ...)  the non-finite stop, naming the last good save.
  with_shardings(abstract, shardings)         a sharded restore target.
  NonFiniteError, Preempted                   how a run stops (the CLIs map them to exit codes).
"""

from __future__ import annotations

import contextlib
import os
import shutil
from typing import Any, Iterator

from absl import logging
import jax
import ml_collections

from cjepa_jax import config as config_lib
from cjepa_jax import workdir_lock


class NonFiniteError(FloatingPointError):
  """The loss or the gradients became NaN or inf."""


class Preempted(Exception):
  """SIGTERM / SIGINT: the state of `step` was checkpointed; the CLI exits with code 75."""

  def __init__(self, step: int):
    super().__init__(f'preempted at step {step}; its checkpoint is saved')
    self.step = step


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


def save_config(config: ml_collections.ConfigDict, workdir: str, start_step: int = 0) -> None:
  """Writes `workdir/config.json`; a different earlier one is kept as `config.<start_step>.json`.

  Called once a start has run its first step cleanly, so config.json always describes the
  checkpoints written since; `config.<N>.json` is the config that ran up to step N.
  """
  path = os.path.join(workdir, 'config.json')
  text = config.to_json_best_effort(indent=2, sort_keys=True)
  if os.path.exists(path):
    with open(path, encoding='utf-8') as f:
      if f.read() == text:
        return
    os.replace(path, os.path.join(workdir, f'config.{start_step}.json'))
  with open(path, 'w', encoding='utf-8') as f:
    f.write(text)


def check_resume_config(saved: dict[str, Any], config: ml_collections.ConfigDict,
                        step_dir: str, state_signature: Any = None) -> None:
  """Refuses a resume whose config changes the state's shapes, or (unless allowed) its meaning.

  `state_signature`: what of a flat config shapes the state (`config_lib.resume_changes`);
  default: pretraining's.

  Raises:
    ValueError: naming the keys that differ (saved -> now) and how to continue.
  """
  shape, meaning = config_lib.resume_changes(saved, config, state_signature)
  def listing(changes):
    return '; '.join(f'{k}: {a!r} -> {b!r}' for k, a, b in
                     ((k, *v) for k, v in sorted(changes.items())))
  if shape:
    raise ValueError(
        f'The checkpoint {step_dir} was saved with another model ({listing(shape)}), so this '
        'config cannot resume it: use a new --workdir, or start a new workdir from its weights '
        'with --config.init_from=<this workdir> (the checkpoint is kept).')
  if meaning and not config.allow_config_change:
    raise ValueError(
        f'Resuming {step_dir} with a config that changes the run ({listing(meaning)}): pass the '
        'saved values again, use a new --workdir, or add --config.allow_config_change=True to '
        'continue with the new values.')
  for key, (old, new) in sorted(meaning.items()):
    logging.warning('Resuming with a changed config (allow_config_change): %s %r -> %r.',
                    key, old, new)


def with_shardings(abstract_tree: Any, shardings: Any) -> Any:
  """ShapeDtypeStructs of `abstract_tree` carrying `shardings` (a restore target)."""
  return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                      abstract_tree, shardings)


def remove_if_empty(workdir: str) -> None:
  """Removes a workdir this start created when a failed start left nothing in it but empty dirs."""
  for root, dirs, files in os.walk(workdir):
    if files:
      return
    del root, dirs
  shutil.rmtree(workdir, ignore_errors=True)


def check_finite(step: int, finite: jax.Array, last_good: int | None, workdir: str,
                 lr_key: str = 'optim.lr') -> None:
  """NonFiniteError naming the step, the last good checkpoint and what to try, unless `finite`."""
  if not bool(jax.device_get(finite)):
    if last_good is None:
      kept = 'No checkpoint was written before it.'
    else:
      kept = (f'The last good checkpoint (step {last_good}) in {workdir}/checkpoints is kept and '
              'nothing later was saved.')
    raise NonFiniteError(
        f'Non-finite loss or gradients at step {step}. {kept} Lower --config.{lr_key}, set '
        '--config.optim.grad_clip=1.0, or use --config.model.dtype=float32 to find the cause, '
        'then restart with the same --workdir.')
