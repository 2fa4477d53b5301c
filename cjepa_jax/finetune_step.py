"""The fine-tuning train state, optimizer, pure train step and evaluation step.

The train state is a plain dict pytree, like pretraining's:
  step        int32 []     optimizer steps taken.
  rng         uint32 [2]   base key: step k mixes and drops paths with fold_in(rng, k).
  params      {'encoder', 'head_norm', 'head'}  (models/classifier.py), float32.
  opt_state   optax state of `params`.

The optimizer is MAE / BEiT's: AdamW (b1, b2) with decoupled weight decay on the kernels only
(optim.weight_decay_mask), lr = base_lr * batch_size / 256 with a linear warm-up from 0 and a
cosine decay to final_lr, and layer-wise lr decay: every update (weight decay included, as a
torch param group's lr scales both) is multiplied by `optim.layerwise_lr_multipliers` of its
parameter, 1 for the head.

One step, inside one jitted function: Mixup / CutMix and label smoothing of the batch
(mixup.py), the classifier with drop path, soft-target cross-entropy, the AdamW + LLRD update.
The evaluation step scores the clean centre crops: summed top-1 / top-5 hits and cross-entropy of
the valid examples.

This module imports no TensorFlow.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import optax

from cjepa_jax import mixup
from cjepa_jax import optim
from cjepa_jax import sharding
from cjepa_jax.models import classifier as classifier_lib
from cjepa_jax.models import vit

State = dict[str, Any]
Batch = dict[str, jax.Array]
Metrics = dict[str, jax.Array]


def peak_lr(config: ml_collections.ConfigDict) -> float:
  """MAE's linear scaling rule: base_lr * batch_size / 256."""
  return float(config.optim.base_lr) * config.batch_size / 256


def lr_schedule(config: ml_collections.ConfigDict, total_steps: int,
                steps_per_epoch: int) -> optax.Schedule:
  """Linear warm-up 0 -> peak_lr over W steps, then cosine to final_lr at total_steps.

  W = optim.warmup_steps if > 0, else round(warmup_epochs * steps_per_epoch), capped at the run.
  """
  o = config.optim
  w = int(o.warmup_steps) if o.warmup_steps > 0 else int(round(o.warmup_epochs * steps_per_epoch))
  w = max(0, min(w, total_steps - 1))
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=peak_lr(config), warmup_steps=w,
      decay_steps=max(total_steps, w + 1), end_value=float(o.final_lr))


def lr_multipliers(params: Any, depth: int, layer_decay: float) -> Any:
  """The LLRD multiplier of every parameter: the encoder's by layer, 1 for the head."""
  return {name: (optim.layerwise_lr_multipliers(tree, depth, layer_decay) if name == 'encoder'
                 else jax.tree.map(lambda _: jnp.float32(1.0), tree))
          for name, tree in params.items()}


def make_optimizer(config: ml_collections.ConfigDict, schedule: optax.Schedule,
                   abstract_params: Any, depth: int) -> optax.GradientTransformation:
  """AdamW (masked decoupled weight decay) with the lr schedule, then the LLRD multipliers."""
  o = config.optim
  parts = []
  if o.grad_clip > 0:
    parts.append(optax.clip_by_global_norm(o.grad_clip))
  parts.append(optax.adamw(learning_rate=schedule, b1=o.b1, b2=o.b2, eps=o.eps,
                           weight_decay=o.weight_decay, mask=optim.weight_decay_mask))
  if o.layer_decay < 1.0:
    parts.append(optim.scale_by_tree(lr_multipliers(abstract_params, depth, o.layer_decay)))
  return optax.chain(*parts) if len(parts) > 1 else parts[0]


def init_state(model: classifier_lib.Classifier, tx: optax.GradientTransformation, seed: int,
               image_size: int) -> State:
  """A fresh state: the whole classifier initialised from `seed` (the caller then puts the
  pretrained encoder into `params['encoder']`, see `with_encoder`)."""
  init_key, step_key = jax.random.split(jax.random.PRNGKey(seed))
  images = jnp.zeros((1, image_size, image_size, 3), jnp.float32)
  params = model.init(init_key, images)['params']
  return {'step': jnp.zeros((), jnp.int32), 'rng': step_key, 'params': params,
          'opt_state': tx.init(params)}


def with_encoder(state: State, encoder_params: Any, tx: optax.GradientTransformation) -> State:
  """`state` with `params['encoder']` replaced, and a fresh optimizer state for the new params."""
  params = dict(state['params'], encoder=encoder_params)
  return dict(state, params=params, opt_state=tx.init(params))


def soft_cross_entropy(logits: jax.Array, targets: jax.Array) -> jax.Array:
  """Mean over the batch of -sum_c targets * log_softmax(logits): [B, C], [B, C] -> []."""
  return jnp.mean(-jnp.sum(targets * jax.nn.log_softmax(logits.astype(jnp.float32)), axis=-1))


def make_train_step(config: ml_collections.ConfigDict, model: classifier_lib.Classifier,
                    tx: optax.GradientTransformation, schedule: optax.Schedule
                    ) -> Callable[[State, Batch], tuple[State, Metrics]]:
  """Reads the config once; returns the pure `train_step(state, batch) -> (state, metrics)`."""
  spec = mixup.MixSpec.from_config(config)

  def train_step(state: State, batch: Batch) -> tuple[State, Metrics]:
    step = state['step']
    k_mix, k_drop = jax.random.split(jax.random.fold_in(state['rng'], step))
    images, targets = mixup.mix_batch(k_mix, batch['image'], batch['label'], spec)

    def loss_fn(params):
      logits = model.apply({'params': params}, images, train=True, rngs={'dropout': k_drop})
      return soft_cross_entropy(logits, targets), logits

    (loss, logits), grads = jax.value_and_grad(loss_fn, has_aux=True)(state['params'])
    updates, opt_state = tx.update(grads, state['opt_state'], state['params'])
    params = optax.apply_updates(state['params'], updates)
    grad_norm = optax.tree.norm(grads)
    metrics = dict(
        loss=loss, lr=schedule(step), grad_norm=grad_norm, update_norm=optax.tree.norm(updates),
        param_norm=optax.tree.norm(params),
        # Against the batch's own labels: with Mixup / CutMix a rough, lower-bound signal.
        train_top1=jnp.mean(jnp.argmax(logits, -1) == batch['label']),
        finite=jnp.isfinite(loss) & jnp.isfinite(grad_norm))
    return dict(state, step=step + 1, params=params, opt_state=opt_state), metrics

  return train_step


def make_eval_step(model: classifier_lib.Classifier) -> Callable[[Any, Batch], Metrics]:
  """`eval_step(params, batch)`: sums over the valid examples of top-1 / top-5 hits and of the
  cross-entropy, and their count (the host adds the batches up)."""

  def eval_step(params: Any, batch: Batch) -> Metrics:
    logits = model.apply({'params': params}, batch['image'])
    labels, w = batch['label'], batch['valid'].astype(jnp.float32)
    top5 = jax.lax.top_k(logits, min(5, logits.shape[-1]))[1]
    ce = -jnp.take_along_axis(jax.nn.log_softmax(logits), labels[:, None], axis=-1)[:, 0]
    return dict(top1=jnp.sum(w * (top5[:, 0] == labels)),
                top5=jnp.sum(w * jnp.any(top5 == labels[:, None], axis=-1)),
                loss=jnp.sum(w * ce), count=jnp.sum(w))

  return eval_step


def abstract_batch(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh, batch_size: int,
                   with_valid: bool) -> dict[str, jax.ShapeDtypeStruct]:
  """A batch as sharded ShapeDtypeStructs: image [B, S, S, 3], label [B] (and valid [B])."""
  size, s = config.data.image_size, sharding.batch_sharding(mesh)
  out = {'image': jax.ShapeDtypeStruct((batch_size, size, size, 3), jnp.float32, sharding=s),
         'label': jax.ShapeDtypeStruct((batch_size,), jnp.int32, sharding=s)}
  if with_valid:
    out['valid'] = jax.ShapeDtypeStruct((batch_size,), jnp.bool_, sharding=s)
  return out


class Setup(NamedTuple):
  """What `setup` builds for a fine-tuning run."""
  model: classifier_lib.Classifier
  tx: optax.GradientTransformation
  schedule: optax.Schedule
  state_shardings: Any
  abstract_state: Any
  init_fn: Callable[[], State]             # Jitted: a fresh state, created directly sharded.
  jitted_step: Callable[[State, Batch], tuple[State, Metrics]]
  jitted_eval: Callable[[Any, Batch], Metrics]
  trace_count: list[int]                   # How often the train step was traced (compiled).
  total_steps: int
  steps_per_epoch: int
  eval_batch_size: int


def setup(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh, encoder: vit.Encoder
          ) -> Setup:
  """The classifier over `encoder` (its drop path, dtype and kernel set from `config.model`),
  the optimizer and the jitted steps on `mesh`. Compiles nothing."""
  eval_batch = int(config.eval_batch_size or config.batch_size)
  for b in (config.batch_size, eval_batch):
    sharding.check_batch_divisible(b, mesh, jax.process_count())
  m = config.model
  encoder = encoder.clone(drop_path_rate=float(m.drop_path_rate), remat_policy=m.remat_policy,
                          attention_impl=m.attention)
  model = classifier_lib.Classifier(encoder, int(config.data.num_classes))
  total_steps, steps_per_epoch = optim.run_length(config)
  schedule = lr_schedule(config, total_steps, steps_per_epoch)
  size = int(config.data.image_size)
  abstract_params = jax.eval_shape(
      lambda: model.init(jax.random.key(0), jnp.zeros((1, size, size, 3)))['params'])
  tx = make_optimizer(config, schedule, abstract_params, encoder.num_layers)
  abstract_state = jax.eval_shape(lambda: init_state(model, tx, config.seed, size))
  state_shardings = sharding.fsdp_shardings(mesh, abstract_state)
  init_fn = jax.jit(lambda: init_state(model, tx, config.seed, size),
                    out_shardings=state_shardings)

  step_fn = make_train_step(config, model, tx, schedule)
  trace_count = [0]

  def counted_step(state, batch):
    trace_count[0] += 1
    return step_fn(state, batch)

  batch_sh = {k: v.sharding for k, v in
              abstract_batch(config, mesh, config.batch_size, False).items()}
  eval_sh = {k: v.sharding for k, v in abstract_batch(config, mesh, eval_batch, True).items()}
  jitted_step = jax.jit(counted_step, in_shardings=(state_shardings, batch_sh),
                        out_shardings=(state_shardings, sharding.replicated(mesh)),
                        donate_argnums=0)
  jitted_eval = jax.jit(make_eval_step(model),
                        in_shardings=(state_shardings['params'], eval_sh),
                        out_shardings=sharding.replicated(mesh))
  return Setup(model, tx, schedule, state_shardings, abstract_state, init_fn, jitted_step,
               jitted_eval, trace_count, total_steps, steps_per_epoch, eval_batch)
