"""The fine-tuning train state and pure train step.

The train state is a plain dict pytree, like pretraining's:
  step        int32 []     optimizer steps taken.
  rng         uint32 [2]   base key: step k mixes and drops paths with fold_in(rng, k).
  params      {'encoder', 'head_norm', 'head'}  (models/classifier.py), float32.
  opt_state   optax state of `params`.

The optimizer is MAE / BEiT's AdamW with layer-wise lr decay (optim.make_finetune_optimizer).

One step, inside one jitted function: Mixup / CutMix and label smoothing of the batch
(mixup.py), the classifier with drop path, soft-target cross-entropy, the AdamW + LLRD update.
The evaluation of the classifier is an evaluator (evals/classify.py).

`StepSpec.from_config(config)` reads what the step and its `setup` need, once, where the config
enters (the trainer, the compile CLI). This module imports no TensorFlow.
"""

from __future__ import annotations

import dataclasses
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


@dataclasses.dataclass(frozen=True)
class StepSpec:
  """What fine-tuning's step and `setup` read of the config (config.py says what each key is)."""
  optim: optim.LayerDecayAdamW
  length: optim.RunLength
  mix: mixup.MixSpec
  num_classes: int              # data.num_classes: the head's width.
  image_size: int               # data.image_size
  batch_size: int               # The global batch.
  seed: int
  drop_path_rate: float         # model.drop_path_rate
  remat_policy: str             # model.remat_policy
  attention: str                # model.attention

  @classmethod
  def from_config(cls, config: ml_collections.ConfigDict) -> StepSpec:
    """Reads the optimizer, run length, mixing and the classifier's settings of `config`."""
    m = config.model
    return cls(optim.LayerDecayAdamW.from_config(config), optim.RunLength.from_config(config),
               mixup.MixSpec.from_config(config), int(config.data.num_classes),
               int(config.data.image_size), config.batch_size, config.seed,
               float(m.drop_path_rate), m.remat_policy, m.attention)


def init_state(model: classifier_lib.Classifier, tx: optax.GradientTransformation, seed: int,
               image_size: int) -> State:
  """A fresh state: the whole classifier initialised from `seed` (fine-tuning then puts the
  pretrained encoder into `params['encoder']`, with a fresh optimizer state: finetune.py's
  `initial_state`)."""
  init_key, step_key = jax.random.split(jax.random.PRNGKey(seed))
  images = jnp.zeros((1, image_size, image_size, 3), jnp.float32)
  params = model.init(init_key, images)['params']
  return {'step': jnp.zeros((), jnp.int32), 'rng': step_key, 'params': params,
          'opt_state': tx.init(params)}


def soft_cross_entropy(logits: jax.Array, targets: jax.Array) -> jax.Array:
  """Mean over the batch of -sum_c targets * log_softmax(logits): [B, C], [B, C] -> []."""
  return jnp.mean(-jnp.sum(targets * jax.nn.log_softmax(logits.astype(jnp.float32)), axis=-1))


def make_train_step(spec: mixup.MixSpec, model: classifier_lib.Classifier,
                    tx: optax.GradientTransformation, schedule: optax.Schedule
                    ) -> Callable[[State, Batch], tuple[State, Metrics]]:
  """The pure `train_step(state, batch) -> (state, metrics)`, batches mixed as `spec` says."""

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


class Setup(NamedTuple):
  """What `setup` builds for a fine-tuning run."""
  model: classifier_lib.Classifier
  tx: optax.GradientTransformation
  schedule: optax.Schedule
  state_shardings: Any
  abstract_state: Any
  init_fn: Callable[[], State]             # Jitted: a fresh state, created directly sharded.
  jitted_step: Callable[[State, Batch], tuple[State, Metrics]]
  trace_count: list[int]                   # How often the train step was traced (compiled).
  total_steps: int
  steps_per_epoch: int


def setup(spec: StepSpec, mesh: jax.sharding.Mesh, encoder: vit.Encoder) -> Setup:
  """The classifier over `encoder` (its drop path, remat and attention kernel from `spec`), the
  optimizer and the jitted step on `mesh`. Compiles nothing."""
  sharding.check_batch_divisible(spec.batch_size, mesh, jax.process_count())
  encoder = encoder.clone(drop_path_rate=spec.drop_path_rate, remat_policy=spec.remat_policy,
                          attention_impl=spec.attention)
  model = classifier_lib.Classifier(encoder, spec.num_classes)
  schedule = optim.finetune_lr_schedule(spec.optim, spec.length)
  size = spec.image_size
  abstract_params = jax.eval_shape(
      lambda: model.init(jax.random.key(0), jnp.zeros((1, size, size, 3)))['params'])
  tx = optim.make_finetune_optimizer(spec.optim, schedule, abstract_params, encoder.num_layers)
  jitted = sharding.jit_train(lambda: init_state(model, tx, spec.seed, size),
                              make_train_step(spec.mix, model, tx, schedule), mesh,
                              sharding.abstract_batch(spec.batch_size, size, mesh))
  return Setup(model, tx, schedule, jitted.state_shardings, jitted.abstract_state,
               jitted.init_fn, jitted.jitted_step, jitted.trace_count, spec.length.total_steps,
               spec.length.steps_per_epoch)
