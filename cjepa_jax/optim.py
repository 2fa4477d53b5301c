"""The optimizers: pretraining's AdamW with the reference I-JEPA schedules (lr, weight decay, EMA
momentum) and the EMA update; fine-tuning's AdamW with layer-wise lr decay (MAE / BEiT). Each
takes its frozen spec (`AdamW`, `LayerDecayAdamW`, the run's `RunLength`), which the trainers
read once from the config (`from_config`).

Step convention: every schedule here is a function of the 0-based optimizer step k, which is
optax's update count (0 for the first update) and the trainer's step counter before the update.
The reference's torch schedulers are stepped once *before* each optimizer step, so its k-th update
uses the scheduler value at its internal step k + 1; our lr and weight-decay schedules include that
+1 and match the reference update for update. Its EMA momentum generator starts at i = 0, so the
momentum after update k is ema_schedule(k), no shift.

Lengths (reference `init_opt`/`train.py`, T = the run's length in steps, see `RunLength`):
  * lr: linear warmup start_lr -> lr over W steps, then cosine lr -> final_lr over
    int(ipe_scale * T) - W steps (the reference stretches the lr schedule by ipe_scale too).
  * weight decay: cosine weight_decay -> final_weight_decay over int(ipe_scale * T) steps.
  * EMA momentum: linear ema[0] -> ema[1] over T * ipe_scale steps.
Past its end each schedule holds its final value. (The reference's formulas keep following the
cosine past the end, which only matters for ipe_scale < 1; holding is the intended behaviour.)

Fine-tuning (`make_finetune_optimizer`, config.default_finetune_config's `optim.*`): AdamW (b1, b2)
with decoupled weight decay on the kernels only (`weight_decay_mask`), lr = base_lr * batch_size /
256 with a linear warm-up from 0 and a cosine decay to final_lr, and layer-wise lr decay: every
update (weight decay included) is multiplied by `layerwise_lr_multipliers` of its parameter, 1 for
the head.
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import optax


@dataclasses.dataclass(frozen=True)
class RunLength:
  """The run's length in steps, and how the recipe gave it (`from_config`, read once).

  steps_per_epoch = data.num_train_examples // batch_size (at least 1; the reference loader drops
  the last partial batch). total_steps = config.total_steps if > 0, else
  epochs * steps_per_epoch.
  """
  total_steps: int
  steps_per_epoch: int
  epochs: float = 0.0        # config.epochs (the warm-up keeps its share of them).
  by_steps: bool = False     # Whether config.total_steps (> 0) gave the length.

  @classmethod
  def from_config(cls, config: ml_collections.ConfigDict) -> RunLength:
    """Reads `batch_size`, `data.num_train_examples`, `total_steps` and `epochs`.

    Raises:
      ValueError: a batch size <= 0, or neither total_steps nor epochs > 0.
    """
    if config.batch_size <= 0:
      raise ValueError(f'batch_size must be > 0; got {config.batch_size}.')
    steps_per_epoch = max(1, int(config.data.num_train_examples) // int(config.batch_size))
    if config.total_steps > 0:
      total = int(config.total_steps)
    elif config.epochs > 0:
      total = int(round(config.epochs * steps_per_epoch))
    else:
      raise ValueError('Set config.total_steps > 0 or config.epochs > 0 to define the run length; '
                       f'got total_steps={config.total_steps}, epochs={config.epochs}.')
    return cls(total, steps_per_epoch, float(config.epochs), config.total_steps > 0)


@dataclasses.dataclass(frozen=True)
class AdamW:
  """Pretraining's optimizer and schedules: `config.optim.*` and `ipe_scale`, read once."""
  lr: float
  start_lr: float
  final_lr: float
  warmup_epochs: float
  warmup_steps: int
  weight_decay: float
  final_weight_decay: float
  b1: float
  b2: float
  eps: float
  grad_clip: float
  ema: tuple[float, float]
  ipe_scale: float = 1.0

  @classmethod
  def from_config(cls, config: ml_collections.ConfigDict) -> AdamW:
    o = config.optim
    return cls(o.lr, o.start_lr, o.final_lr, o.warmup_epochs, o.warmup_steps, o.weight_decay,
               o.final_weight_decay, o.b1, o.b2, o.eps, o.grad_clip, tuple(o.ema),
               config.ipe_scale)


def warmup_steps(o: AdamW, length: RunLength) -> int:
  """Number of linear-warmup steps W, capped at total_steps.

  * optim.warmup_steps > 0: taken as is.
  * else, with the length given by total_steps (> 0) and epochs > 0: W keeps the recipe's
    fraction, int(warmup_epochs / epochs * total_steps), so short runs keep the schedule's shape.
  * else: int(warmup_epochs * steps_per_epoch), as the reference (truncation, like its int()).
  """
  total_steps = length.total_steps
  if o.warmup_steps > 0:
    w = int(o.warmup_steps)
  elif length.by_steps and length.epochs > 0:
    w = int(o.warmup_epochs / length.epochs * total_steps)
  else:
    w = int(o.warmup_epochs * length.steps_per_epoch)
  return max(0, min(w, total_steps))


def _check_ipe_scale(o: AdamW) -> None:
  if o.ipe_scale <= 0:
    raise ValueError(
        f'ipe_scale must be > 0 (1.0 in every reference recipe); got {o.ipe_scale}.')


def _schedule_length(o: AdamW, total_steps: int) -> int:
  """The reference's T_max = int(ipe_scale * epochs * ipe) of the lr and wd schedules."""
  _check_ipe_scale(o)
  return max(1, int(o.ipe_scale * total_steps))


def _cosine(start: float, end: float, steps: int) -> optax.Schedule:
  """Half-cosine from `start` (count 0) to `end` (count >= steps); either direction."""
  unit = optax.cosine_decay_schedule(1.0, max(1, steps))  # 1 -> 0.
  return lambda count: end + (start - end) * unit(count)


def lr_schedule(o: AdamW, length: RunLength) -> optax.Schedule:
  """Learning rate at optimizer step k (reference WarmupCosineSchedule at its step s = k + 1).

  s < W: start_lr + s / W * (lr - start_lr); else
  final_lr + (lr - final_lr) * 0.5 * (1 + cos(pi * min(1, (s - W) / (T_max - W)))).
  """
  w = warmup_steps(o, length)
  t_max = _schedule_length(o, length.total_steps)
  base = _cosine(o.lr, o.final_lr, t_max - w)
  if w > 0:
    base = optax.join_schedules([optax.linear_schedule(o.start_lr, o.lr, w), base], [w])
  return lambda step: base(step + 1)


def wd_schedule(o: AdamW, length: RunLength) -> optax.Schedule:
  """Weight decay at optimizer step k (reference CosineWDSchedule at its step s = k + 1).

  final_wd + (wd - final_wd) * 0.5 * (1 + cos(pi * min(1, s / T_max))): 0.04 rising to 0.4.
  """
  base = _cosine(o.weight_decay, o.final_weight_decay,
                 _schedule_length(o, length.total_steps))
  return lambda step: base(step + 1)


def ema_schedule(o: AdamW, length: RunLength) -> optax.Schedule:
  """EMA momentum used after optimizer step k: ema[0] + k * (ema[1] - ema[0]) / (T * ipe_scale)."""
  m0, m1 = o.ema
  _check_ipe_scale(o)
  return optax.linear_schedule(m0, m1, transition_steps=length.total_steps * o.ipe_scale)


def _leaf_name(path: tuple[Any, ...]) -> str:
  if not path:
    return ''
  k = path[-1]
  return str(getattr(k, 'key', getattr(k, 'name', getattr(k, 'idx', k))))


def weight_decay_mask(params: Any) -> Any:
  """Bool pytree: True on the leaves that get weight decay.

  The reference decays every parameter except those whose name contains 'bias' or that are 1-D.
  Here: decay iff ndim >= 2, the leaf name has no 'bias', and it is not a norm 'scale'. The name
  rules make the result independent of nn.scan, whose stacked LayerNorm scales and biases are
  [depth, D]. So Dense/conv kernels and the predictor's mask_token [1, 1, w] (3-D, hence decayed
  in the reference too) are decayed; biases and LayerNorm scales are not. Non-trainable arrays
  (e.g. the fixed position embedding) must not live in params: torch skips them (no grad), while
  optax would decay them.
  """
  def decay(path, x):
    name = _leaf_name(path)
    return bool(jnp.ndim(x) >= 2 and 'bias' not in name and name != 'scale')
  return jax.tree_util.tree_map_with_path(decay, params)


class Schedules(NamedTuple):
  """The run's schedules, each a function of the optimizer step k (0 before the first update).

  Built once per run (`make_schedules`) and handed to both the optimizer and the train step, which
  logs their values and applies the EMA momentum.
  """
  lr: optax.Schedule
  weight_decay: optax.Schedule
  ema: optax.Schedule


def make_schedules(o: AdamW, length: RunLength) -> Schedules:
  """The lr, weight-decay and EMA-momentum schedules of a run of `length.total_steps` steps."""
  return Schedules(lr=lr_schedule(o, length), weight_decay=wd_schedule(o, length),
                   ema=ema_schedule(o, length))


def make_optimizer(o: AdamW, schedules: Schedules) -> optax.GradientTransformation:
  """AdamW with the scheduled lr and decoupled, scheduled, masked weight decay.

  optax.adamw's update is -lr * (adam_step + wd * p), i.e. p <- p - lr * wd * p - lr * adam_step,
  which is torch.optim.AdamW exactly (it multiplies the decay by lr too). Optional global-norm
  clipping first when optim.grad_clip > 0 (the reference does not clip).
  """
  adamw = optax.adamw(
      learning_rate=schedules.lr,
      b1=o.b1, b2=o.b2, eps=o.eps,
      weight_decay=schedules.weight_decay,
      mask=weight_decay_mask)
  if o.grad_clip > 0:
    return optax.chain(optax.clip_by_global_norm(o.grad_clip), adamw)
  return adamw


def ema_update(target: Any, online: Any, momentum: jax.Array | float) -> Any:
  """target <- m * target + (1 - m) * online, leaf by leaf, in float32 (target dtypes kept)."""
  m = jnp.asarray(momentum, jnp.float32)
  return jax.tree.map(
      lambda t, o: (m * jnp.asarray(t, jnp.float32)
                    + (1.0 - m) * jnp.asarray(o, jnp.float32)).astype(jnp.asarray(t).dtype),
      target, online)


def layerwise_lr_multipliers(encoder_params: Any, depth: int, decay: float) -> Any:
  """BEiT / MAE layer-wise lr decay for fine-tuning: a multiplier per leaf of `encoder_params`.

  The patch embedding is layer 0, block i is layer i + 1, everything after the blocks (the final
  norm) is layer depth + 1; layer l gets decay^(depth + 1 - l): patch embedding decay^(depth+1),
  block i decay^(depth - i), the final norm 1. A fine-tuning head outside the encoder takes 1.
  Works on the unscanned layout (`blocks_<i>`) and on the scanned one (`blocks`, leaves
  [depth, ...]: the multiplier is then a [depth, 1, ...] array, one per block).
  """
  if not 0.0 < decay <= 1.0:
    raise ValueError(f'layer_decay={decay} must be in (0, 1] (1: no decay).')

  def one(path: tuple[Any, ...], leaf: Any) -> Any:
    top = str(getattr(path[0], 'key', path[0]))
    if top == 'patch_embed':
      return jnp.float32(decay ** (depth + 1))
    if top.startswith('blocks_'):
      return jnp.float32(decay ** (depth - int(top.split('_')[1])))
    if top == 'blocks':   # Scanned: one multiplier per block on the leading axis.
      per_block = decay ** (depth - jnp.arange(depth, dtype=jnp.float32))
      return per_block.reshape((depth,) + (1,) * (jnp.ndim(leaf) - 1))
    return jnp.float32(1.0)

  return jax.tree_util.tree_map_with_path(one, encoder_params)


def scale_by_tree(multipliers: Any) -> optax.GradientTransformation:
  """Multiplies each update by its leaf of `multipliers` (a pytree of the params' structure)."""
  return optax.stateless(lambda updates, params=None: jax.tree.map(
      lambda u, m: (u * m).astype(u.dtype), updates, multipliers))


# ------------------------------------------------------------------------------------------------
# Fine-tuning's optimizer (MAE / BEiT): AdamW with layer-wise lr decay.
# ------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class LayerDecayAdamW:
  """Fine-tuning's optimizer and lr schedule: its `config.optim.*` and `batch_size`, read once."""
  base_lr: float
  batch_size: int
  final_lr: float
  warmup_epochs: float
  warmup_steps: int
  weight_decay: float
  layer_decay: float
  b1: float
  b2: float
  eps: float
  grad_clip: float

  @classmethod
  def from_config(cls, config: ml_collections.ConfigDict) -> LayerDecayAdamW:
    o = config.optim
    return cls(o.base_lr, config.batch_size, o.final_lr, o.warmup_epochs, o.warmup_steps,
               o.weight_decay, o.layer_decay, o.b1, o.b2, o.eps, o.grad_clip)

  @property
  def peak_lr(self) -> float:
    """MAE's linear scaling rule: base_lr * batch_size / 256."""
    return float(self.base_lr) * self.batch_size / 256


def finetune_lr_schedule(o: LayerDecayAdamW, length: RunLength) -> optax.Schedule:
  """Linear warm-up 0 -> peak_lr over W steps, then cosine to final_lr at total_steps.

  W = optim.warmup_steps if > 0, else round(warmup_epochs * steps_per_epoch), capped at the run.
  """
  total_steps = length.total_steps
  if o.warmup_steps > 0:
    w = int(o.warmup_steps)
  else:
    w = int(round(o.warmup_epochs * length.steps_per_epoch))
  w = max(0, min(w, total_steps - 1))
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=o.peak_lr, warmup_steps=w,
      decay_steps=max(total_steps, w + 1), end_value=float(o.final_lr))


def llrd_multipliers(params: Any, depth: int, layer_decay: float) -> Any:
  """The LLRD multiplier of every parameter of {'encoder', <head>...}: the encoder's by layer
  (`layerwise_lr_multipliers`), 1 for everything else."""
  return {name: (layerwise_lr_multipliers(tree, depth, layer_decay) if name == 'encoder'
                 else jax.tree.map(lambda _: jnp.float32(1.0), tree))
          for name, tree in params.items()}


def make_finetune_optimizer(o: LayerDecayAdamW, schedule: optax.Schedule, abstract_params: Any,
                            depth: int) -> optax.GradientTransformation:
  """AdamW (masked decoupled weight decay) with the lr schedule, then the LLRD multipliers.

  Every update, weight decay included (as a torch param group's lr scales both), is multiplied
  by its parameter's multiplier; `optim.layer_decay` = 1 leaves the multipliers out.
  """
  parts = []
  if o.grad_clip > 0:
    parts.append(optax.clip_by_global_norm(o.grad_clip))
  parts.append(optax.adamw(learning_rate=schedule, b1=o.b1, b2=o.b2, eps=o.eps,
                           weight_decay=o.weight_decay, mask=weight_decay_mask))
  if o.layer_decay < 1.0:
    parts.append(scale_by_tree(llrd_multipliers(abstract_params, depth, o.layer_decay)))
  return optax.chain(*parts) if len(parts) > 1 else parts[0]
