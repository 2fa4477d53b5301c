r"""Pretrains a ViT with I-JEPA or C-JEPA on whatever devices are present.

  python -m cjepa_jax.train --config configs/cifar10_vit_tiny.py --workdir /tmp/run \
      [--config.total_steps=2000 --config.data.data_dir=... --config.mesh.fsdp=2 ...]

(also installed as `cjepa-train`). Restarting with the same `--workdir` resumes from the latest
complete checkpoint in `DIR/checkpoints/`: the step, the schedules, the EMA, the mask keys and the
data position all continue, so the run ends as if it had never stopped.

Writes `DIR/config.json`, `DIR/metrics.jsonl`, TensorBoard events in DIR and
`DIR/checkpoints/<step>/`, holding `DIR/trainer.lock` meanwhile (one trainer per workdir:
`workdir_lock.py`). A resumed run first drops what an interrupted one logged past its checkpoint
(`metrics.py`), so every step is logged once.

Faults (README, "Faults"): SIGTERM / SIGINT save the current step and exit with code 75
(`preemption.py`); a checkpoint directory that cannot be written stops the run before any compile,
a failed save within the step; a checkpoint that fails its checksums is reported and the newest
earlier one that verifies is used; resuming with a config that changes the state's shapes is
refused, one that changes the run's meaning needs `--config.allow_config_change=True`; a run that
is already complete says so and exits 0; a second trainer on a workdir fails at once naming the
first; every data and label check runs before the workdir is created.

This module is where a pretraining config enters: `pretraining_task` reads it once, into the
frozen specs the layers below take (the mesh's, the step's, the data's, the evaluators', the
loop's), and builds the task (models, the jitted step, RankMe on log steps, the monitors of
`config.evals`); the loop that runs it is cjepa_jax/loop.py, which fine-tuning runs too.
"""

from __future__ import annotations

import json
import sys
from typing import Any

from absl import flags
import jax
import jax.numpy as jnp
import ml_collections
from ml_collections import config_flags

from cjepa_jax.checkpoint import reading as ckpt_reading
from cjepa_jax import cli
from cjepa_jax import config as config_lib
from cjepa_jax import flops as flops_lib
from cjepa_jax import loop
from cjepa_jax import sharding
from cjepa_jax import train_step as step_lib
from cjepa_jax.data.spec import DataSpec
from cjepa_jax.evals import base as evals_base
from cjepa_jax.evals import registry as evals_registry

_FLAGS: dict[str, Any] = {}  # Defined by `run()`, not at import.

# Scalars logged as the log step's value; everything else in the step's metrics is averaged over
# the window. (`target_effective_rank` is computed by the trainer on log steps only.)
_LAST_VALUE = ('lr', 'weight_decay', 'ema_momentum')


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Runs (or resumes) pretraining; returns the last logged metrics.

  Returns `{'step': N, 'already_complete': True}` without training when the workdir's latest
  checkpoint is the run's last step.

  Raises:
    ValueError (config, data, checkpoint problems), metrics.NonFiniteError, preemption.Preempted
    (SIGTERM / SIGINT: the current step was saved).
  """
  config_lib.validate(config)
  return loop.run(pretraining_task(config), workdir)


def pretraining_task(config: ml_collections.ConfigDict) -> loop.Task:
  """The models, the jitted step and the monitors of `config`, checked; compiles nothing.

  `config` is read here once, into the specs of the loop, the evaluators, the step, the data and
  the mesh; what is built from them takes the specs.
  """
  from cjepa_jax.data import input_pipeline  # pylint: disable=g-import-not-at-top  (TF: host only)

  run_spec = loop.RunSpec.from_config(config)
  evals = evals_base.EvalsSpec.from_config(config)
  step_spec = step_lib.StepSpec.from_config(config)   # Checks the model, masks and objective.
  data = DataSpec.from_config(config)
  mesh = sharding.make_mesh(sharding.MeshSpec.from_config(config))
  init_from, saved_config = config.init_from, json.loads(config.to_json_best_effort())

  run = step_lib.setup(step_spec, mesh)   # Builds the models; compiles nothing.
  input_pipeline.check_dataset(data)  # Fails fast, naming how to prepare the data.
  # The evaluators of `config.evals` run during pretraining (kNN, few-shot monitors). Made now:
  # they check their splits' labels before anything is written.
  evaluators = evals_registry.monitors(evals, data, mesh, run.models.encoder)
  rank_fn = jax.jit(lambda x: step_lib.effective_rank(x - jnp.mean(x, axis=0)))

  def init_state() -> dict[str, Any]:
    state = run.init_fn()
    if init_from:
      state = ckpt_reading.load_init_from(init_from, state, run.state_shardings)
    return state

  def diagnostics(state: dict[str, Any], aux: tuple[Any, ...]) -> dict[str, float]:
    del state
    (pooled,) = aux
    # RankMe of this step's pooled target features: an SVD of [B, D], on log steps only.
    return {'target_effective_rank': float(rank_fn(pooled))}

  return loop.Task(
      run=run_spec, mesh=mesh, setup=run, init_state=init_state, saved_config=saved_config,
      data=data, evaluators=evaluators,
      eval_params=step_lib.target_encoder_params,
      flops_per_step=flops_lib.step_flops(run.models.step_shape()) * data.batch_size,
      last_value_keys=_LAST_VALUE, lr_key='optim.lr', diagnostics=diagnostics)


def main(argv: list[str]) -> None:
  cli.trainer_main(
      argv, _FLAGS['config'].value, _FLAGS['workdir'].value, train_and_evaluate,
      example='--config configs/cifar10_vit_tiny.py --workdir /tmp/cjepa_run',
      complete_hint=' (to train further, raise --config.total_steps or --config.epochs and add '
                    '--config.allow_config_change=True)')


def run() -> None:
  """Console-script entry point (`cjepa-train`): flags, jax.distributed start-up, then `main`."""
  _FLAGS['config'] = config_flags.DEFINE_config_file(
      'config', None, 'Recipe file (configs/*.py[:arg]).', lock_config=True)
  _FLAGS['workdir'] = flags.DEFINE_string('workdir', None,
                                          'Where checkpoints, metrics and logs go.')
  cli.run('cjepa-train', main, doc=__doc__, module=sys.argv[0] if __name__ == '__main__'
          else __name__, extra_help=config_lib.help_text, renamed=config_lib.RENAMED_PRETRAINING)


if __name__ == '__main__':
  run()
