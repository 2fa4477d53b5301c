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
The eval split's centre crops are scored every `eval_every_steps` and at the end (top-1 / top-5,
`eval_*` in metrics.jsonl).

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

import copy
import os
import sys
from typing import Any

from absl import flags
from absl import logging
import jax
import ml_collections
from ml_collections import config_flags

from cjepa_jax.checkpoint import layout as ckpt_layout
from cjepa_jax.checkpoint import manager as ckpt_manager
from cjepa_jax.checkpoint import reading as ckpt_reading
from cjepa_jax import cli
from cjepa_jax import config as config_lib
from cjepa_jax import finetune_step as step_lib
from cjepa_jax import flops as flops_lib
from cjepa_jax import metrics as metrics_lib
from cjepa_jax import preemption
from cjepa_jax import sharding
from cjepa_jax import workdir as workdir_lib
from cjepa_jax.evals import features as features_lib
from cjepa_jax.models import jepa

_FLAGS: dict[str, Any] = {}  # Defined by `run()`, not at import.
BEST_DIR = 'best'
_LAST_VALUE = ('lr',)
# What of `model.*` a pretrained checkpoint fixes (the rest: dtype, remat, attention, drop path,
# comes from the fine-tuning config).
_FROM_CHECKPOINT = ('variant', 'depth', 'scan')


def _resolved_config(config: ml_collections.ConfigDict, info: dict[str, Any]
                     ) -> ml_collections.ConfigDict:
  """`config` with the encoder's variant, depth and scan that the checkpoint brings."""
  out = copy.deepcopy(config)
  with out.unlocked():
    for key in _FROM_CHECKPOINT:
      if key in info['model']:
        out.model[key] = info['model'][key]
    out.model.depth = int(out.model.depth or 0)
  return out


def _check_image_size(config: ml_collections.ConfigDict, info: dict[str, Any]) -> None:
  if info['checkpoint'] != features_lib.RANDOM and info['image_size'] != config.data.image_size:
    raise ValueError(
        f"The checkpoint {info['checkpoint']} was pretrained at image size {info['image_size']} "
        f'but config.data.image_size={config.data.image_size}; fine-tune at '
        f"--config.data.image_size={info['image_size']} (position embeddings and patch grid "
        'follow the pretraining resolution).')


def finetune(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Runs (or resumes) fine-tuning; returns the last logged metrics with the final evaluation.

  Raises:
    ValueError (config, data, checkpoint problems), workdir.NonFiniteError, workdir.Preempted.
  """
  config_lib.validate_finetune(config)
  created = not os.path.exists(workdir)
  try:
    return _finetune(config, workdir)
  except BaseException:
    if created and jax.process_index() == 0:
      workdir_lib.remove_if_empty(workdir)
    raise


def _finetune(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  from cjepa_jax.data import input_pipeline  # pylint: disable=g-import-not-at-top  (TF: host only)

  mesh = sharding.make_mesh(config)
  saved = _workdir_config(workdir)
  if saved is not None:   # The workdir's own checkpoints say which encoder; `pretrained` is unread.
    encoder = jepa.encoder_from_model_config(saved['model'])
    info = dict(saved.get('finetune_source') or {})
    resolved = copy.deepcopy(config)
    if config.pretrained != features_lib.RANDOM:
      resolved = _resolved_config(config, dict(model=saved['model']))
  else:
    encoder, info = features_lib.resolve_encoder(config)
    _check_image_size(config, info)
    resolved = _resolved_config(config, info)
  run = step_lib.setup(resolved, mesh, encoder)
  input_pipeline.check_dataset(resolved)
  input_pipeline.check_label_splits(resolved)  # Same classes in both splits, num_classes of them.
  # Nothing is written in the workdir before its lock is held (process 0 holds it for the job).
  with workdir_lib.locked(workdir, force=config.force_unlock) as lock:
    ckpt = ckpt_manager.Checkpointer(
        workdir, keep=config.keep_ckpts, keep_every_steps=config.keep_every_steps,
        save_every_steps=config.ckpt_every_steps)
    best = ckpt_manager.Checkpointer(os.path.join(workdir, BEST_DIR), keep=1)
    try:
      return _loop(resolved, workdir, mesh, run, encoder, info, ckpt, best, input_pipeline, lock)
    finally:
      best.close()
      ckpt.close()


def _workdir_config(workdir: str) -> dict[str, Any] | None:
  """The config saved with the workdir's latest complete checkpoint; None before the first."""
  if not os.path.isdir(os.path.join(workdir, ckpt_layout.CHECKPOINTS_DIR)):
    return None
  try:
    return ckpt_reading.load_config(workdir)
  except ValueError:   # No complete checkpoint yet.
    return None


def _saved_config(config: ml_collections.ConfigDict, info: dict[str, Any]) -> dict[str, Any]:
  """The config saved with each checkpoint: the resolved config and where the encoder came from."""
  out = config.to_dict()
  out['finetune_source'] = {k: v for k, v in info.items() if k != 'model'}
  return out


def initial_state(run: step_lib.Setup, config: ml_collections.ConfigDict, encoder: Any,
                  info: dict[str, Any], mesh: jax.sharding.Mesh) -> dict[str, Any]:
  """A fresh state (step 0, new head, new optimizer state) around the encoder `info` locates.

  Only the encoder's weights are read from a checkpoint (`features.load_encoder_params`), then
  laid out with the state's shardings.
  """
  state = run.init_fn()
  encoder_params = features_lib.load_encoder_params(config, encoder, info,
                                                    sharding.replicated(mesh))
  if info['checkpoint'] != features_lib.RANDOM:
    logging.info('Encoder: the %s encoder of %s (step %s).', info['encoder'], info['checkpoint'],
                 info['step'])
  encoder_params = jax.device_put(encoder_params, run.state_shardings['params']['encoder'])
  return jax.jit(lambda s, e: step_lib.with_encoder(s, e, run.tx),
                 out_shardings=run.state_shardings)(state, encoder_params)


def evaluate(run: step_lib.Setup, params: Any, config: ml_collections.ConfigDict,
             mesh: jax.sharding.Mesh, input_pipeline: Any) -> dict[str, float]:
  """Top-1 / top-5 (%) and cross-entropy of the centre crops of `config.data.eval_split` (its
  first / a seeded subset of `eval_examples` when > 0, see `input_pipeline.make_eval_iterator`).

  Every process reads its part; the sums are over the global batch (padded rows excluded).
  """
  batch_sharding = sharding.batch_sharding(mesh)
  totals = None
  for batch in input_pipeline.make_eval_iterator(
      config, config.data.eval_split, batch_size=run.eval_batch_size,
      num_examples=int(config.eval_examples) or None):
    batch.pop('data_skipped', None)
    batch.pop('pos', None)
    out = run.jitted_eval(params, input_pipeline.to_global_array(batch, batch_sharding))
    totals = out if totals is None else jax.tree.map(lambda a, b: a + b, totals, out)
  host = {k: float(v) for k, v in jax.device_get(totals).items()}
  n = max(host['count'], 1.0)
  return dict(eval_top1=100.0 * host['top1'] / n, eval_top5=100.0 * host['top5'] / n,
              eval_loss=host['loss'] / n, eval_examples=int(host['count']))


def _loop(config, workdir, mesh, run, encoder, info, ckpt, best, input_pipeline, lock
          ) -> dict[str, Any]:
  is_main = jax.process_index() == 0
  total_steps = run.total_steps
  ckpt.report_incomplete()
  best.report_incomplete()
  latest = ckpt.latest_step()
  extra: dict[str, Any] = {}
  saved_config = _saved_config(config, info)
  if latest is not None:
    workdir_lib.check_resume_config(ckpt.restore_config(latest), config,
                                    str(ckpt.directory / str(latest)),
                                    config_lib.finetune_state_signature)
    start_step, state = ckpt.restore_latest(
        workdir_lib.with_shardings(run.abstract_state, run.state_shardings))
    extra = ckpt.restore_extra(start_step)
    logging.info('Resuming from the checkpoint of step %d in %s.', start_step, workdir)
    last_good: int | None = start_step
  else:
    state = initial_state(run, config, encoder, info, mesh)
    last_good = None
  start_step = int(jax.device_get(state['step']))
  best_top1 = float(extra.get('best_top1', float('-inf')))
  best_step = extra.get('best_step')
  if start_step >= total_steps:
    logging.info('Already complete at step %d (of %d) in %s: nothing to do.', start_step,
                 total_steps, workdir)
    return {'step': start_step, 'already_complete': True}
  logging.info('Mesh %s over %d devices (%d processes); %d steps of batch %d (%d per epoch); '
               'peak lr %.3g.', dict(mesh.shape), jax.device_count(), jax.process_count(),
               total_steps, config.batch_size, run.steps_per_epoch, step_lib.peak_lr(config))

  # Rows and events an interrupted start logged past `start_step` go first: each step once.
  writer = metrics_lib.MetricWriter(workdir, enabled=is_main, start_step=start_step)
  batch_sharding = sharding.batch_sharding(mesh)
  data = input_pipeline.make_train_iterator(config, start_step=start_step)
  spec = encoder.spec
  num_patches = (config.data.image_size // spec['patch']) ** 2
  flops_per_step = config.batch_size * flops_lib.finetune_step_flops(
      spec['width'], spec['depth'], spec['mlp_dim'], num_patches, spec['patch'],
      int(config.data.num_classes))
  peak = flops_lib.peak_tflops(override=config.peak_tflops) * 1e12 * jax.device_count()
  log = metrics_lib.LogWindow(config.batch_size, total_steps, run.steps_per_epoch,
                              flops_per_step, peak, writer, last_value_keys=_LAST_VALUE)
  pending = None
  result: dict[str, Any] = {}
  try:
    with preemption.Preemption() as preempt:
      for step in range(start_step + 1, total_steps + 1):
        host_batch = next(data)
        host_batch.pop('data_skipped', None)
        batch = input_pipeline.to_global_array(host_batch, batch_sharding)
        state, step_metrics = run.jitted_step(state, batch)
        if step == start_step + 1 and is_main:
          workdir_lib.save_config(config, workdir, start_step)
        ckpt.check()
        best.check()
        lock.check()   # Another trainer forced the lock over: stop before writing again.
        if pending is not None:
          workdir_lib.check_finite(*pending, last_good, workdir, lr_key='optim.base_lr')
        pending = (step, step_metrics['finite'])
        log.add(step, step_metrics)

        eval_now = step % config.eval_every_steps == 0 or step == total_steps
        log_now = step % config.log_every_steps == 0 or eval_now
        save_now = step % config.ckpt_every_steps == 0 or step == total_steps
        preempted = preempt.reached(step)
        if log_now or save_now or preempted:
          workdir_lib.check_finite(*pending, last_good, workdir, lr_key='optim.base_lr')
          pending = None
        improved = False
        if log_now:
          def evaluation(eval_now=eval_now, params=state['params']):
            nonlocal best_top1, best_step, improved
            if not eval_now:
              return {}
            out = evaluate(run, params, config, mesh, input_pipeline)
            if out['eval_top1'] > best_top1:
              best_top1, best_step, improved = out['eval_top1'], step, True
            logging.info('eval at step %d: top-1 %.2f%%, top-5 %.2f%% (best %.2f%% at step %s).',
                         step, out['eval_top1'], out['eval_top5'], best_top1, best_step)
            return dict(out, best_top1=best_top1, best_step=best_step)
          log.flush(step, evaluation, compiles=run.trace_count[0])
          result = log.last
        extra = {'best_top1': best_top1, 'best_step': best_step}
        # The two managers never write at once: concurrent async saves of two orbax managers share
        # multi-process barrier names ('... set_value_start is already ongoing' on 2 processes).
        if improved:
          ckpt.wait()
          best.save(step, state, saved_config, force=True, extra=extra)
        if save_now or preempted:
          best.wait()
          saved = ckpt.save(step, state, saved_config, force=step == total_steps or preempted,
                            extra=extra)
          last_good = step
        if preempted:
          ckpt.wait()
          best.wait()
          preempt.log_stop(step, saved, str(ckpt.directory))
          raise workdir_lib.Preempted(step)
    ckpt.wait()
    best.wait()
  finally:
    writer.close()
  if run.trace_count[0] != 1:
    logging.warning('The train step compiled %d times; expected once.', run.trace_count[0])
  return result


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
          extra_help=lambda: config_lib.help_text(config_lib.default_finetune_config))


if __name__ == '__main__':
  run()
