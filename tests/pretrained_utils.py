"""A pretraining checkpoint written the way the trainer writes it, without training: for the tests
of what reads one (the probe, fine-tuning, the 2-process jobs). Not a test module."""

from __future__ import annotations

import pathlib
from typing import Callable

import jax
import numpy as np

from cjepa_jax.checkpoint import manager as ckpt_manager
from cjepa_jax import optim
from cjepa_jax import train_step as step_lib
from cjepa_jax.models import jepa


def save_pretraining_checkpoint(workdir: pathlib.Path, config, step: int,
                                move: Callable[[dict], dict]) -> dict:
  """Saves the trainer's `init_state` for `config`, changed by `move`, as step `step`'s checkpoint.

  `move(state) -> state` pulls the context encoder and the EMA target apart, as training does, so
  that a reader that restores the wrong one of the two is caught (`config.use_ema=False`: no
  target to move, pass `lambda s: s`). Running real train steps would
  only add a compile. Returns the saved state (host numpy arrays).
  """
  models = jepa.build_models(jepa.ModelSpec.from_config(config))
  tx = optim.make_optimizer(optim.AdamW.from_config(config), optim.make_schedules(
      optim.AdamW.from_config(config), optim.RunLength.from_config(config)))
  state = jax.device_get(jax.jit(
      lambda: step_lib.init_state(models, tx, config.seed, config.use_ema))())
  state = move(state)
  state['step'] = np.asarray(step, np.int32)
  with ckpt_manager.Checkpointer(str(workdir), async_save=False) as ckpt:
    ckpt.save(step, state, config, force=True)
  return state
