"""The train state and the pure I-JEPA / C-JEPA train step.

One step, all inside one jitted function (no host work, so it compiles once and overlaps with
input):
  1. masks from a per-step key (`fold_in(state['rng'], step)`: resuming at step s draws the same
     masks as an uninterrupted run);
  2. target encoder (EMA params) on the full image under stop_gradient, layer-normed without
     affine; the tokens of each target block are the targets;
  3. context encoder on the context tokens, predictor at the target positions;
  4. the C-JEPA loss (plain I-JEPA when `vicreg.weight == 0`), gradients, the optax update;
  5. the EMA update of the target encoder with the scheduled momentum.

The train state is a plain dict pytree:
  step           int32 []            optimizer steps taken.
  rng            uint32 [2]          base key (raw, so orbax stores it as an array).
  params         {'encoder', 'predictor'[, 'projector']}  trained parameters (float32).
  target_params  encoder-shaped      the EMA target encoder; never receives gradients.
  opt_state      optax state of `params`.

This module imports no TensorFlow, so the step can be benchmarked on synthetic batches alone.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import optax

from cjepa_jax import flops as flops_lib
from cjepa_jax import losses
from cjepa_jax import masks as masks_lib
from cjepa_jax import optim
from cjepa_jax.models import predictor as predictor_lib
from cjepa_jax.models import projector as projector_lib
from cjepa_jax.models import vit

State = dict[str, Any]
Batch = dict[str, jax.Array]
Metrics = dict[str, jax.Array]

DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16, 'float16': jnp.float16}


@dataclasses.dataclass(frozen=True)
class Models:
  """The modules of a run and the mask spec they are trained with."""
  encoder: nn.Module
  predictor: nn.Module
  projector: nn.Module | None
  mask_spec: masks_lib.MaskSpec
  image_size: int

  def step_shape(self) -> flops_lib.StepShape:
    """Sizes for the analytic FLOP count."""
    enc = self.encoder.spec
    spec = self.mask_spec
    proj = ()
    if self.projector is not None:
      proj = tuple(int(w) for w in self.projector.spec.split('-'))
    return flops_lib.StepShape(
        width=enc['width'], depth=enc['depth'], mlp_hidden=enc['mlp_dim'],
        num_patches=spec.grid_h * spec.grid_w, patch_size=enc['patch'],
        context_tokens=spec.num_context, target_tokens=spec.max_target,
        num_targets=spec.npred, pred_width=self.predictor.width,
        pred_depth=self.predictor.depth, projector=proj)


def compute_dtype(name: str) -> Any:
  if name not in DTYPES:
    raise ValueError(f'config.model.dtype={name!r} is not one of {sorted(DTYPES)}.')
  return DTYPES[name]


def check_attention(name: str, dtype: Any) -> str:
  """Validates `config.model.attention` against the backend and dtype before anything compiles.

  cuDNN's flash attention exists only on NVIDIA GPUs and only in 16-bit types; without this check
  either mistake surfaces as a lowering error deep inside XLA.
  """
  if name not in vit.ATTENTION_IMPLS:
    raise ValueError(f'config.model.attention={name!r} is not one of {vit.ATTENTION_IMPLS}.')
  if name == 'cudnn':
    backend = jax.default_backend()
    if backend != 'gpu':
      raise ValueError(f"config.model.attention='cudnn' (cuDNN flash attention) needs an NVIDIA "
                       f"GPU, but this run's backend is {backend!r}: use 'xla'.")
    if dtype not in (jnp.bfloat16, jnp.float16):
      raise ValueError("config.model.attention='cudnn' runs in bfloat16 or float16 only: set "
                       "--config.model.dtype=bfloat16, or use --config.model.attention=xla.")
  return name


def build_models(config: ml_collections.ConfigDict) -> Models:
  """Builds encoder, predictor, optional projector and mask spec from the config."""
  vit.parse_variant(config.model.variant)  # First: a bad variant explains the rest.
  spec = masks_lib.MaskSpec.from_config(config)
  dtype = compute_dtype(config.model.dtype)
  attention = check_attention(config.model.attention, dtype)
  common = dict(dtype=dtype, remat_policy=config.model.remat_policy, scan=config.model.scan,
                attention_impl=attention)
  encoder = vit.Encoder(variant=config.model.variant, depth=config.model.depth or None, **common)
  enc = encoder.spec  # Raises a ValueError naming the valid sizes for an unknown variant.
  predictor = predictor_lib.Predictor(
      embed_dim=enc['width'], num_heads=enc['num_heads'], grid=(spec.grid_h, spec.grid_w),
      width=config.model.pred_width, depth=config.model.pred_depth, **common)
  projector = None
  if config.vicreg.weight > 0 and config.vicreg.mode == 'blocks':
    projector = projector_lib.Projector(spec=config.vicreg.projector,
                                        norm=config.vicreg.projector_norm)
  elif config.vicreg.mode not in ('context', 'blocks'):
    raise ValueError(f"config.vicreg.mode={config.vicreg.mode!r}: use 'context' or 'blocks'.")
  return Models(encoder, predictor, projector, spec, int(config.data.image_size))


def _dummy_inputs(models: Models, batch_size: int = 1):
  spec = models.mask_spec
  images = jnp.zeros((batch_size, models.image_size, models.image_size, 3), jnp.float32)
  m = masks_lib.sample_masks(jax.random.key(0), batch_size, spec)
  return images, m


def init_params(models: Models, rng: jax.Array) -> dict[str, Any]:
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


def init_state(models: Models, tx: optax.GradientTransformation, seed: int) -> State:
  """A fresh train state. Jit it with `out_shardings` to create it directly sharded."""
  key = jax.random.PRNGKey(seed)
  init_key, step_key = jax.random.split(key)
  params = init_params(models, init_key)
  return {
      'step': jnp.zeros((), jnp.int32),
      'rng': step_key,
      'params': params,
      # The target starts as an exact copy of the context encoder (reference: deepcopy).
      'target_params': jax.tree.map(jnp.copy, params['encoder']),
      'opt_state': tx.init(params),
  }


def effective_rank(x: jax.Array) -> jax.Array:
  """RankMe (Garrido et al. 2023): exp(entropy) of the normalised singular values of `x [B, D]`."""
  s = jnp.linalg.svd(x.astype(jnp.float32), compute_uv=False)
  p = s / (jnp.sum(s) + 1e-12) + 1e-7
  return jnp.exp(-jnp.sum(p * jnp.log(p)))


def is_log_step(step: int | jax.Array, config: ml_collections.ConfigDict,
                total_steps: int) -> bool | jax.Array:
  """Whether the trainer logs after update number `step` (1 after the first update).

  Every `log_every_steps`, every kNN evaluation and the last step. `step` is a Python int in the
  trainer's loop or a traced int32 inside the train step, so both agree on which steps are logged.
  """
  log = (step % config.log_every_steps == 0) | (step == total_steps)
  if config.evals.knn_every_steps:
    log = log | (step % config.evals.knn_every_steps == 0)
  return log


def make_train_step(config: ml_collections.ConfigDict, models: Models,
                    tx: optax.GradientTransformation, total_steps: int,
                    steps_per_epoch: int) -> Callable[[State, Batch], tuple[State, Metrics]]:
  """Reads the config once and returns the pure `train_step(state, batch)`."""
  loss_kind = config.loss.kind
  vicreg_cfg = config.vicreg
  use_blocks = models.projector is not None
  use_vicreg = config.vicreg.weight > 0
  lr_fn = optim.lr_schedule(config, total_steps, steps_per_epoch)
  wd_fn = optim.wd_schedule(config, total_steps)
  ema_fn = optim.ema_schedule(config, total_steps)
  spec = models.mask_spec

  def train_step(state: State, batch: Batch) -> tuple[State, Metrics]:
    images = batch['image']
    step = state['step']
    m = masks_lib.sample_masks(jax.random.fold_in(state['rng'], step), images.shape[0], spec)

    # Targets: EMA encoder on every patch, layer-normed, gathered per target block.
    h = models.encoder.apply({'params': state['target_params']}, images)
    h = jax.lax.stop_gradient(losses.normalize_targets(h))        # [B, N, D] float32
    targets = losses.gather_tokens(h, m.tgt_idx)                  # [B, M, Kt, D]

    def loss_fn(params):
      z = models.encoder.apply({'params': params['encoder']}, images, m.ctx_idx, m.ctx_valid)
      pred = models.predictor.apply({'params': params['predictor']}, z, m.ctx_idx, m.ctx_valid,
                                    m.tgt_idx, m.tgt_valid)       # [B, M, Kt, D]
      pred = pred.astype(jnp.float32)
      block_emb = None
      if use_blocks:
        block_emb = models.projector.apply({'params': params['projector']},
                                           losses.pool_blocks(pred, m.tgt_valid))
      loss, terms = losses.cjepa_loss(
          pred, targets, m.tgt_valid, ctx=z.astype(jnp.float32), ctx_valid=m.ctx_valid,
          block_embeddings=block_emb, kind=loss_kind, vicreg=vicreg_cfg)
      return loss, terms

    (loss, terms), grads = jax.value_and_grad(loss_fn, has_aux=True)(state['params'])
    updates, opt_state = tx.update(grads, state['opt_state'], state['params'])
    params = optax.apply_updates(state['params'], updates)
    momentum = ema_fn(step)
    target_params = optim.ema_update(state['target_params'], params['encoder'], momentum)

    grad_norm = optax.tree.norm(grads)
    pooled = jnp.mean(h, axis=1)                                  # [B, D]
    # RankMe needs an SVD of the global [B, D]: only on the steps the trainer logs (it logs that
    # step's value), NaN on the others, so the monitor costs nothing on the other steps.
    rank = jax.lax.cond(is_log_step(step + 1, config, total_steps), effective_rank,
                        lambda x: jnp.full((), jnp.nan, jnp.float32),
                        pooled - jnp.mean(pooled, axis=0))
    # An objective without VICReg logs no VICReg terms (they would read as if they mattered).
    metrics = {k: v for k, v in terms.items() if use_vicreg or not k.startswith('vicreg')}
    metrics.update(
        loss=loss,
        lr=lr_fn(step), weight_decay=wd_fn(step), ema_momentum=momentum,
        grad_norm=grad_norm, update_norm=optax.tree.norm(updates),
        param_norm=optax.tree.norm(params),
        target_feature_std=jnp.mean(jnp.std(pooled, axis=0)),
        target_effective_rank=rank,
        context_valid_tokens=jnp.mean(jnp.sum(m.ctx_valid, axis=1).astype(jnp.float32)),
        target_valid_tokens=jnp.mean(jnp.sum(m.tgt_valid, axis=2).astype(jnp.float32)),
        finite=jnp.isfinite(loss) & jnp.isfinite(grad_norm),
    )
    new_state = dict(state, step=step + 1, params=params, target_params=target_params,
                     opt_state=opt_state)
    return new_state, metrics

  return train_step
