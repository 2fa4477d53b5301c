"""The train state and the pure I-JEPA / C-JEPA train step.

One step, all inside one jitted function (no host work, so it compiles once and overlaps with
input):
  1. masks from a per-step key (`fold_in(state['rng'], step)`: resuming at step s draws the same
     masks as an uninterrupted run);
  2. target encoder (EMA params) on the full image under stop_gradient, layer-normed without
     affine; the tokens of each target block are the targets;
  3. context encoder on the context tokens, predictor at the target positions;
  4. the C-JEPA loss (plain I-JEPA when `vicreg.weight == 0`; SIGReg added when
     `sigreg.weight > 0`, its directions from the step's key), gradients, the optax update;
  5. the EMA update of the target encoder with the scheduled momentum (none with `use_ema=False`).
With `accum_steps` = A > 1, steps 2-4 run over A micro-batches in a `lax.scan` and their mean
gradient makes the one update of step 4 (`make_train_step`): a large batch on fewer chips.

The train state is a plain dict pytree:
  step           int32 []            optimizer steps taken.
  rng            uint32 [2]          base key (raw, so orbax stores it as an array).
  params         {'encoder', 'predictor'[, 'projector']}  trained parameters (float32).
  target_params  encoder-shaped      the EMA target encoder; never receives gradients. Absent
                                     with `use_ema=False`: the target is then the online encoder
                                     under stop_gradient (EMA momentum 0), with no second copy.
  opt_state      optax state of `params`.

`StepSpec.from_config(config)` reads what the step and its `setup` need, once, where the config
enters (the trainer, the compile CLI, the benchmarks); everything here takes that spec.

This module imports no TensorFlow, so the step can be benchmarked on synthetic batches alone.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import optax

from cjepa_jax import losses
from cjepa_jax import masks as masks_lib
from cjepa_jax import optim
from cjepa_jax import sharding
from cjepa_jax.models import jepa

State = dict[str, Any]
Batch = dict[str, jax.Array]
Metrics = dict[str, jax.Array]


@dataclasses.dataclass(frozen=True)
class StepSpec:
  """What pretraining's step and `setup` read of the config (config.py says what each key is)."""
  model: jepa.ModelSpec
  optim: optim.AdamW
  length: optim.RunLength
  loss_kind: str               # loss.kind
  vicreg: losses.VICRegSpec
  sigreg: losses.SIGRegSpec
  use_ema: bool
  accum_steps: int             # Micro-batches per step (1: no gradient accumulation).
  batch_size: int              # The global batch.
  seed: int

  @classmethod
  def from_config(cls, config: ml_collections.ConfigDict) -> StepSpec:
    """Reads and checks the model, masks, loss, optimizer and run length of `config`; warns
    (once: the trainer reads its config once) when gradient accumulation changes the objective's
    batch statistics. How the batch splits over the mesh is `setup`'s check.

    Raises:
      ValueError: one line naming the key of a value no run can mean.
    """
    accum = config.get('accum_steps', 1)
    if not isinstance(accum, int) or isinstance(accum, bool) or accum < 1:
      raise ValueError(f'config.accum_steps={accum!r} is invalid: must be an integer >= 1 '
                       '(1: no gradient accumulation).')
    spec = cls(
        model=jepa.ModelSpec.from_config(config), optim=optim.AdamW.from_config(config),
        length=optim.RunLength.from_config(config), loss_kind=config.loss.kind,
        vicreg=losses.VICRegSpec.from_config(config.vicreg),
        sigreg=losses.SIGRegSpec.from_config(config.get('sigreg')),
        use_ema=bool(config.get('use_ema', True)), accum_steps=accum,
        batch_size=config.batch_size, seed=config.seed)
    batch_stats = [name for name, on in (('VICReg', spec.vicreg.weight > 0),
                                          ('SIGReg', spec.sigreg.weight > 0)) if on]
    if accum > 1 and batch_stats:
      logging.warning(
          'accum_steps=%d with %s: its batch statistics are computed per micro-batch of %d '
          'images and the loss averaged over the micro-batches; that is not the full-batch '
          'objective.', accum, ' and '.join(batch_stats), spec.batch_size // accum)
    return spec


def _dummy_inputs(models: jepa.Models, batch_size: int = 1):
  """Zero images and masks of the step's shapes: parameters depend on the input shapes alone."""
  spec = models.mask_spec
  images = jnp.zeros((batch_size, models.image_size, models.image_size, 3), jnp.float32)
  ctx = (batch_size, spec.num_context)
  tgt = (batch_size, spec.npred, spec.max_target)
  m = masks_lib.Masks(jnp.zeros(ctx, jnp.int32), jnp.zeros(ctx, jnp.bool_),
                      jnp.zeros(tgt, jnp.int32), jnp.zeros(tgt, jnp.bool_))
  return images, m


def init_params(models: jepa.Models, rng: jax.Array) -> dict[str, Any]:
  """Initialises {'encoder', 'predictor'[, 'projector']} parameters (float32)."""
  images, m = _dummy_inputs(models)
  k_enc, k_pred, k_proj = jax.random.split(rng, 3)
  enc = models.encoder.init(k_enc, images, m.ctx_idx, m.ctx_valid)['params']
  width = models.encoder.spec['width']
  ctx = jnp.zeros(m.ctx_idx.shape + (width,), jnp.float32)
  pred = models.predictor.init(k_pred, ctx, m.ctx_idx, m.ctx_valid, m.tgt_idx,
                               m.tgt_valid)['params']
  params = {'encoder': enc, 'predictor': pred}
  if models.projector is not None:
    params['projector'] = models.projector.init(k_proj, jnp.zeros((1, width)))['params']
  return params


def init_state(models: jepa.Models, tx: optax.GradientTransformation, seed: int,
               use_ema: bool = True) -> State:
  """A fresh train state. Jit it with `out_shardings` to create it directly sharded.

  `use_ema=False` keeps no `target_params` (the target is the online encoder).
  """
  key = jax.random.PRNGKey(seed)
  init_key, step_key = jax.random.split(key)
  params = init_params(models, init_key)
  state = {'step': jnp.zeros((), jnp.int32), 'rng': step_key, 'params': params,
           'opt_state': tx.init(params)}
  if use_ema:  # The target starts as an exact copy of the context encoder (reference: deepcopy).
    state['target_params'] = jax.tree.map(jnp.copy, params['encoder'])
  return state


def target_encoder_params(state: State) -> Any:
  """The parameters the targets come from: the EMA copy, or the online encoder without one."""
  return state['target_params'] if 'target_params' in state else state['params']['encoder']


# Folded into the step's key for SIGReg's directions (the masks use the step's key itself).
_SIGREG_STREAM = 0x5167


def effective_rank(x: jax.Array) -> jax.Array:
  """RankMe (Garrido et al. 2023): exp(entropy) of the normalised singular values of `x [B, D]`."""
  s = jnp.linalg.svd(x.astype(jnp.float32), compute_uv=False)
  p = s / (jnp.sum(s) + 1e-12) + 1e-7
  return jnp.exp(-jnp.sum(p * jnp.log(p)))


def make_train_step(spec: StepSpec, models: jepa.Models, tx: optax.GradientTransformation,
                    schedules: optim.Schedules, mesh: jax.sharding.Mesh | None = None
                    ) -> Callable[[State, Batch], tuple[State, Metrics, jax.Array]]:
  """The pure `train_step(state, batch)` of `spec`'s objective.

  The step returns `(new_state, metrics, pooled)`: `metrics` are scalars for the trainer's
  window averages; `pooled` [B, D] float32 are the mean-pooled target features of the batch, from
  which the trainer computes RankMe on the steps it logs (`effective_rank`), so the step itself
  knows nothing of the log cadence.

  Gradient accumulation (`spec.accum_steps` = A > 1): the masks are drawn for the whole batch
  as without accumulation, then the batch and its masks are split into A micro-batches
  (`sharding.split_micro`) and a `lax.scan` runs the target encoder, the forward and the
  backward pass of one micro-batch at a time, summing the gradients; one optimizer update and
  one EMA update follow, on the mean gradient. Only one micro-batch's activations are live at once. The JEPA
  loss is a mean over equally many valid tokens per image (one block size per batch), so the
  accumulated step equals the full-batch step to float rounding. Terms built on batch statistics
  (VICReg's variance / covariance, SIGReg, the 'blocks' projector's BatchNorm) are computed per
  micro-batch and averaged: a different (noisier) objective, as with a smaller per-device batch.
  `mesh` (optional) pins the micro-batches' sharding to the batch axes.
  """
  loss_kind, vicreg, sigreg, use_ema = spec.loss_kind, spec.vicreg, spec.sigreg, spec.use_ema
  use_blocks = models.projector is not None
  mask_spec = models.mask_spec
  accum = int(spec.accum_steps)

  def micro_loss(params, target, images, m, step_key):
    """Loss, terms, gradients and pooled target features [b, D] of one (micro-)batch."""
    # Targets: EMA encoder (or the online one, without EMA) on every patch, layer-normed,
    # gathered per target block.
    with jax.named_scope('target'):
      h = models.encoder.apply({'params': target}, images)
      h = jax.lax.stop_gradient(losses.normalize_targets(h))      # [b, N, D] float32
      targets = losses.gather_tokens(h, m.tgt_idx)                # [b, M, Kt, D]

    def loss_fn(params):
      z = models.encoder.apply({'params': params['encoder']}, images, m.ctx_idx, m.ctx_valid)
      pred = models.predictor.apply({'params': params['predictor']}, z, m.ctx_idx, m.ctx_valid,
                                    m.tgt_idx, m.tgt_valid)       # [b, M, Kt, D]
      pred = pred.astype(jnp.float32)
      block_emb = None
      if use_blocks:
        block_emb = models.projector.apply({'params': params['projector']},
                                           losses.pool_blocks(pred, m.tgt_valid))
      loss, terms = losses.cjepa_loss(
          pred, targets, m.tgt_valid, ctx=z.astype(jnp.float32), ctx_valid=m.ctx_valid,
          block_embeddings=block_emb, kind=loss_kind, vicreg=vicreg, sigreg_spec=sigreg,
          sigreg_key=jax.random.fold_in(step_key, _SIGREG_STREAM))
      return loss, terms

    (loss, terms), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    return loss, terms, grads, jnp.mean(h, axis=1)

  def accumulated_loss(params, target, images, m, step_key):
    """`micro_loss` over A micro-batches in a scan: mean loss, terms and gradients."""
    split = lambda x: sharding.split_micro(x, accum, mesh)
    xs = (split(images), jax.tree.map(split, m))

    def body(carry, x):
      loss, terms, grads, pooled = micro_loss(params, target, *x, step_key)
      carry = jax.tree.map(jnp.add, carry, (loss, terms, grads))
      return carry, pooled

    first = jax.tree.map(lambda a: a[0], xs)
    zeros = jax.eval_shape(lambda: micro_loss(params, target, *first, step_key)[:3])
    zeros = jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), zeros)
    (loss, terms, grads), pooled = jax.lax.scan(body, zeros, xs)
    loss, terms, grads = jax.tree.map(lambda a: a / accum, (loss, terms, grads))
    return loss, terms, grads, sharding.merge_micro(pooled)

  def train_step(state: State, batch: Batch) -> tuple[State, Metrics, jax.Array]:
    images = batch['image']
    step = state['step']
    step_key = jax.random.fold_in(state['rng'], step)
    with jax.named_scope('masks'):  # Named scopes only label the ops for profiles.
      m = masks_lib.sample_masks(step_key, images.shape[0], mask_spec)
    forward = micro_loss if accum == 1 else accumulated_loss
    loss, terms, grads, pooled = forward(state['params'], target_encoder_params(state), images,
                                         m, step_key)
    with jax.named_scope('optimizer'):
      updates, opt_state = tx.update(grads, state['opt_state'], state['params'])
      params = optax.apply_updates(state['params'], updates)
    new_state = dict(state, step=step + 1, params=params, opt_state=opt_state)
    if use_ema:
      with jax.named_scope('ema'):
        momentum = schedules.ema(step)
        new_state['target_params'] = optim.ema_update(state['target_params'], params['encoder'],
                                                       momentum)

    with jax.named_scope('monitoring'):
      grad_norm = optax.tree.norm(grads)
      # An objective without VICReg logs no VICReg terms (they would read as if they mattered).
      metrics = {k: v for k, v in terms.items() if vicreg.enabled or not k.startswith('vicreg')}
      if use_ema:
        metrics['ema_momentum'] = momentum
      metrics.update(
          loss=loss,
          lr=schedules.lr(step), weight_decay=schedules.weight_decay(step),
          grad_norm=grad_norm, update_norm=optax.tree.norm(updates),
          param_norm=optax.tree.norm(params),
          target_feature_std=jnp.mean(jnp.std(pooled, axis=0)),
          context_valid_tokens=jnp.mean(jnp.sum(m.ctx_valid, axis=1).astype(jnp.float32)),
          target_valid_tokens=jnp.mean(jnp.sum(m.tgt_valid, axis=2).astype(jnp.float32)),
          finite=jnp.isfinite(loss) & jnp.isfinite(grad_norm),
      )
    return new_state, metrics, pooled

  return train_step


class Setup(NamedTuple):
  """What `setup` builds for a run (also what benchmarks/step.py times)."""
  models: jepa.Models
  tx: optax.GradientTransformation
  schedules: optim.Schedules
  state_shardings: Any           # NamedShardings of the train state (FSDP over 'fsdp').
  abstract_state: Any            # ShapeDtypeStructs of the train state.
  init_fn: Callable[[], Any]     # Jitted: a fresh state, created directly sharded.
  jitted_step: Callable[[Any, Any], tuple[Any, Any, Any]]
  trace_count: list[int]         # [n]: how often the step was traced, i.e. compiled.
  total_steps: int
  steps_per_epoch: int


def setup(spec: StepSpec, mesh: jax.sharding.Mesh) -> Setup:
  """Models, schedules, optimizer, state shardings and the jitted step of `spec` on `mesh`.

  Checks the batch's split (and its micro-batches') over `mesh` on the way (every error names
  the key); compiles nothing. Needs no absl flags and no TensorFlow.
  """
  models = jepa.build_models(spec.model)
  schedules = optim.make_schedules(spec.optim, spec.length)
  tx = optim.make_optimizer(spec.optim, schedules)
  sharding.check_batch_divisible(spec.batch_size, mesh, jax.process_count(), spec.accum_steps)
  init = lambda: init_state(models, tx, spec.seed, spec.use_ema)
  step = make_train_step(spec, models, tx, schedules, mesh)
  jitted = sharding.jit_train(
      init, step, mesh, sharding.abstract_batch(spec.batch_size, spec.model.image_size, mesh),
      aux_shardings=(sharding.batch_sharding(mesh),))
  return Setup(models, tx, schedules, jitted.state_shardings, jitted.abstract_state,
               jitted.init_fn, jitted.jitted_step, jitted.trace_count, spec.length.total_steps,
               spec.length.steps_per_epoch)
