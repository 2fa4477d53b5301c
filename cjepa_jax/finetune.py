r"""Fine-tunes a pretrained (or random) JEPA encoder as a classifier, every weight trained.

  python -m cjepa_jax.finetune --config configs/finetune_cifar10.py --workdir /tmp/ft \
      --config.pretrained=/tmp/cjepa_run [--config.encoder=context --config.total_steps=...]

(also installed as `cjepa-finetune`). `--config.pretrained` takes what the probe's does: a
pretraining workdir (its latest complete checkpoint; the EMA target encoder, or the context
encoder with `--config.encoder=context`), one step directory, a converted reference checkpoint, or
`random` (the baseline: `model.*` of the config, initialised with `seed`). Only the encoder's
weights are read (never the predictor or the optimizer state), through the probes' own
`evals.features.resolve_encoder` / `load_encoder_params`; the head (models/classifier.py) and the
optimizer start fresh.

The recipe (configs/finetune_*.py, config.default_finetune_config): MAE / BEiT's AdamW with
layer-wise lr decay, drop path, Mixup / CutMix and label smoothing (finetune_step.py, mixup.py).
The eval split's centre crops are scored by the `classify` evaluator (evals/classify.py) every
`evals.classify.every_steps` and at the end (top-1 / top-5, `eval_*` in metrics.jsonl).

This module is where a fine-tuning config enters: `finetuning_task` resolves it against the
encoder's checkpoint and reads it once, into the frozen specs the layers below take, and builds
fine-tuning's task; the loop that runs it (restore or init, saves, the best checkpoint,
preemption, the finite check) is pretraining's, cjepa_jax/loop.py.

Writes DIR/config.json, DIR/metrics.jsonl, TensorBoard events in DIR, the latest checkpoints in
DIR/checkpoints/<step>/ and the best one (eval top-1) in DIR/best/checkpoints/<step>/; both are
orbax checkpoints of the fine-tuning state, so `cjepa-probe --config.pretrained=DIR/best` does not
apply (their encoder is under params/encoder). Restarting with the same --workdir resumes exactly
(the data position, mixing, drop path and the best-so-far continue); SIGTERM / SIGINT save the
current step and exit with code 75, as pretraining. As pretraining, the trainer holds
DIR/trainer.lock (one trainer per workdir), checks the data and labels before DIR is created, and
a resumed run first drops what an interrupted one logged past its checkpoint.
"""

from __future__ import annotations

import os
import sys
from typing import Any

from absl import flags
from absl import logging
import jax
import ml_collections
from ml_collections import config_flags

from cjepa_jax.checkpoint import layout as ckpt_layout
from cjepa_jax.checkpoint import reading as ckpt_reading
from cjepa_jax import cli
from cjepa_jax import config as config_lib
from cjepa_jax import finetune_step as step_lib
from cjepa_jax import flops as flops_lib
from cjepa_jax import loop
from cjepa_jax import sharding
from cjepa_jax.data.spec import DataSpec
from cjepa_jax.evals import base as evals_base
from cjepa_jax.evals import features as features_lib
from cjepa_jax.evals import registry as evals_registry
from cjepa_jax.models import jepa

_FLAGS: dict[str, Any] = {}  # Defined by `run()`, not at import.
BEST_DIR = loop.BEST_DIR
_LAST_VALUE = ('lr',)


def finetune(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Runs (or resumes) fine-tuning; returns the last logged metrics with the final evaluation.

  Raises:
    ValueError (config, data, checkpoint problems), metrics.NonFiniteError, preemption.Preempted.
  """
  config_lib.validate_finetune(config)
  return loop.run(finetuning_task(config, workdir), workdir)


def finetuning_task(config: ml_collections.ConfigDict, workdir: str) -> loop.Task:
  """The classifier over the encoder `config.pretrained` (or the workdir's own checkpoints)
  names, its jitted step and evaluation, checked; compiles nothing.

  `config` is read here once, into the specs of the step, the data, the mesh, the evaluators and
  the loop. The encoder's checkpoint fixes only the config's `model.*` variant, depth and scan
  (`config_lib.resolve_finetune`), which the step, the data and the mesh do not read; the
  resolved config is what the run records (DIR/config.json, each checkpoint) and resumes by.
  """
  from cjepa_jax.data import input_pipeline  # pylint: disable=g-import-not-at-top  (TF: host only)

  encoder, info, checkpoint_model, checkpoint_size = _encoder(config, workdir)
  step_spec = step_lib.StepSpec.from_config(config)
  data = DataSpec.from_config(config)
  mesh = sharding.make_mesh(sharding.MeshSpec.from_config(config))
  seed = config.seed
  run = step_lib.setup(step_spec, mesh, encoder)
  input_pipeline.check_dataset(data)
  input_pipeline.check_label_splits(data)  # Same classes in both splits, num_classes of them.

  resolved = config_lib.resolve_finetune(config, checkpoint_model, checkpoint_size,
                                         info.get('checkpoint', ''))
  run_spec = loop.RunSpec.from_config(resolved)
  evals = evals_base.EvalsSpec.from_config(resolved)
  # Saved with each checkpoint: the resolved config and where the encoder came from.
  saved_config = dict(resolved.to_dict(),
                      finetune_source={k: v for k, v in info.items() if k != 'model'})
  evaluators = evals_registry.monitors(evals, data, mesh, run.model)
  spec = encoder.spec
  num_patches = (data.image_size // spec['patch']) ** 2
  flops_per_step = data.batch_size * flops_lib.finetune_step_flops(
      spec['width'], spec['depth'], spec['mlp_dim'], num_patches, spec['patch'],
      int(data.num_classes))
  return loop.Task(
      run=run_spec, mesh=mesh, setup=run,
      init_state=lambda: initial_state(run, seed, encoder, info, mesh),
      saved_config=saved_config, data=data, evaluators=evaluators,
      eval_params=lambda state: state['params'], flops_per_step=flops_per_step,
      last_value_keys=_LAST_VALUE, lr_key='optim.base_lr',
      state_signature=config_lib.finetune_state_signature, keep_best='eval_top1',
      describe=f'; peak lr {step_spec.optim.peak_lr:.3g}')


def _encoder(config: ml_collections.ConfigDict, workdir: str
             ) -> tuple[Any, dict[str, Any], dict[str, Any], int | None]:
  """(the encoder, where its weights are: `features.resolve_encoder`'s info, the `model.*` its
  checkpoint fixes, the image size the config must keep: None when free).

  A workdir with checkpoints of its own says which encoder in its saved config; `pretrained` is
  then not read again.
  """
  saved = _workdir_config(workdir)
  if saved is not None:
    info = dict(saved.get('finetune_source') or {})
    fixed = {} if config.pretrained == features_lib.RANDOM else saved['model']
    return jepa.encoder_from_model_config(saved['model']), info, fixed, None
  source = features_lib.EncoderSource.from_config(config)
  encoder, info = features_lib.resolve_encoder(source)
  pretrained = info['checkpoint'] != features_lib.RANDOM
  return encoder, info, info['model'], info['image_size'] if pretrained else None


def _workdir_config(workdir: str) -> dict[str, Any] | None:
  """The config saved with the workdir's latest complete checkpoint; None before the first."""
  if not os.path.isdir(os.path.join(workdir, ckpt_layout.CHECKPOINTS_DIR)):
    return None
  try:
    return ckpt_reading.load_config(workdir)
  except ValueError:   # No complete checkpoint yet.
    return None


def initial_state(run: step_lib.Setup, seed: int, encoder: Any, info: dict[str, Any],
                  mesh: jax.sharding.Mesh) -> dict[str, Any]:
  """A fresh state (step 0, new head, new optimizer state) around the encoder `info` locates.

  Only the encoder's weights are read from a checkpoint (`features.load_encoder_params`; a
  `random` encoder is initialised with `seed`), then laid out with the state's shardings.
  """
  state = run.init_fn()
  encoder_params = features_lib.load_encoder_params(seed, encoder, info,
                                                    sharding.replicated(mesh))
  if info['checkpoint'] != features_lib.RANDOM:
    logging.info('Encoder: the %s encoder of %s (step %s).', info['encoder'], info['checkpoint'],
                 info['step'])
  encoder_params = jax.device_put(encoder_params, run.state_shardings['params']['encoder'])

  def with_encoder(state: dict[str, Any], encoder_params: Any) -> dict[str, Any]:
    """`state` with `params['encoder']` replaced, and a fresh optimizer state for the new params."""
    params = dict(state['params'], encoder=encoder_params)
    return dict(state, params=params, opt_state=run.tx.init(params))

  return jax.jit(with_encoder, out_shardings=run.state_shardings)(state, encoder_params)


def main(argv: list[str]) -> None:
  cli.trainer_main(argv, _FLAGS['config'].value, _FLAGS['workdir'].value, finetune,
                   example='--config configs/finetune_cifar10.py --workdir /tmp/cjepa_finetune')


def run() -> None:
  """Console-script entry point (`cjepa-finetune`)."""
  _FLAGS['config'] = config_flags.DEFINE_config_file(
      'config', None, 'Recipe file (configs/finetune_*.py[:arg]).', lock_config=True)
  _FLAGS['workdir'] = flags.DEFINE_string('workdir', None,
                                          'Where checkpoints, metrics and logs go.')
  cli.run('cjepa-finetune', main, doc=__doc__,
          module=sys.argv[0] if __name__ == '__main__' else __name__,
          extra_help=lambda: config_lib.help_text(config_lib.default_finetune_config),
          renamed=config_lib.RENAMED_FINETUNING)


if __name__ == '__main__':
  run()
