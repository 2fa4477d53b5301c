"""Mixup, CutMix and label smoothing for fine-tuning: batch-level, on the device, in the step.

timm's `Mixup(mode='batch')`, which the MAE / BEiT fine-tuning recipes (and so the I-JEPA and
C-JEPA papers) use: one draw per batch picks CutMix with probability `switch_prob` (when both are
on), else Mixup, and lam ~ Beta(alpha, alpha) of the chosen one. Each image is mixed with the
image at the mirrored position of the global batch (timm's `x.flip(0)`), so the pairs, and hence
the result, do not depend on how the batch is sharded.

  Mixup:  x <- lam * x + (1 - lam) * x[::-1].
  CutMix: a box of side ratio sqrt(1 - lam) centred at a uniform pixel (clipped to the image) is
          pasted from x[::-1]; lam becomes the kept area fraction 1 - box area / (H * W)
          (timm's `correct_lam`).
  Targets: lam * smooth(y) + (1 - lam) * smooth(y[::-1]), smooth(y) = one_hot(y) * (1 - s) + s / C,
          so every row sums to 1.

Everything is drawn from one key (the step's), so a resumed run mixes exactly as an uninterrupted
one.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import ml_collections


class MixSpec(NamedTuple):
  """What the step reads of `config.mix` (frozen: the config is read once)."""
  mixup_alpha: float        # Beta(alpha, alpha) of Mixup's lam; 0: no Mixup.
  cutmix_alpha: float       # Beta(alpha, alpha) of CutMix's lam; 0: no CutMix.
  switch_prob: float        # With both on: the probability that a batch uses CutMix.
  label_smoothing: float    # s in smooth(y) above.
  num_classes: int

  @classmethod
  def from_config(cls, config: ml_collections.ConfigDict) -> MixSpec:
    m = config.mix
    return cls(float(m.mixup_alpha), float(m.cutmix_alpha), float(m.switch_prob),
               float(m.label_smoothing), int(config.data.num_classes))

  @property
  def enabled(self) -> bool:
    return self.mixup_alpha > 0 or self.cutmix_alpha > 0


class MixParams(NamedTuple):
  """One batch's draw. `box` = (top, bottom, left, right), half-open, used only by CutMix."""
  lam: jax.Array           # float32 []: the weight of the batch's own images and labels.
  use_cutmix: jax.Array    # bool []
  box: jax.Array           # int32 [4]


def smooth_one_hot(labels: jax.Array, num_classes: int, smoothing: float) -> jax.Array:
  """labels [B] -> float32 [B, C]: (1 - s) on the label plus s / C everywhere (rows sum to 1)."""
  return (jax.nn.one_hot(labels, num_classes, dtype=jnp.float32) * (1.0 - smoothing)
          + smoothing / num_classes)


def cutmix_box(lam: jax.Array, center: jax.Array, height: int, width: int) -> jax.Array:
  """timm's `rand_bbox`: int32 [4] (top, bottom, left, right) of the box that CutMix pastes.

  Side lengths int(H * sqrt(1 - lam)), int(W * sqrt(1 - lam)), centred at `center` = (cy, cx),
  then clipped to the image.
  """
  ratio = jnp.sqrt(1.0 - lam)
  cut_h = jnp.floor(height * ratio).astype(jnp.int32)
  cut_w = jnp.floor(width * ratio).astype(jnp.int32)
  cy, cx = center[0], center[1]
  return jnp.stack([jnp.clip(cy - cut_h // 2, 0, height), jnp.clip(cy + cut_h // 2, 0, height),
                    jnp.clip(cx - cut_w // 2, 0, width), jnp.clip(cx + cut_w // 2, 0, width)])


def sample(key: jax.Array, spec: MixSpec, height: int, width: int) -> MixParams:
  """Draws one batch's mixing: which of Mixup / CutMix, lam, and CutMix's box."""
  k_switch, k_mix, k_cut, k_center = jax.random.split(key, 4)
  if spec.mixup_alpha > 0 and spec.cutmix_alpha > 0:
    use_cutmix = jax.random.uniform(k_switch) < spec.switch_prob
  else:
    use_cutmix = jnp.asarray(spec.cutmix_alpha > 0)
  def beta(k, alpha):
    return jax.random.beta(k, alpha, alpha) if alpha > 0 else jnp.float32(1.0)
  lam = jnp.where(use_cutmix, beta(k_cut, spec.cutmix_alpha), beta(k_mix, spec.mixup_alpha))
  center = jax.random.randint(k_center, (2,), 0, jnp.array([height, width]))
  box = cutmix_box(lam, center, height, width)
  area = (box[1] - box[0]) * (box[3] - box[2])
  lam = jnp.where(use_cutmix, 1.0 - area / (height * width), lam).astype(jnp.float32)
  return MixParams(lam, use_cutmix, box)


def apply(images: jax.Array, labels: jax.Array, params: MixParams, spec: MixSpec
          ) -> tuple[jax.Array, jax.Array]:
  """Mixes `images [B, H, W, C]` with their mirror; returns (images, targets [B, C] float32)."""
  lam = params.lam
  flipped = images[::-1]
  rows = jnp.arange(images.shape[1])[:, None]
  cols = jnp.arange(images.shape[2])[None, :]
  top, bottom, left, right = params.box
  in_box = ((rows >= top) & (rows < bottom) & (cols >= left) & (cols < right))[None, :, :, None]
  cut = jnp.where(in_box, flipped, images)
  mixed = lam.astype(images.dtype) * images + (1.0 - lam).astype(images.dtype) * flipped
  out = jnp.where(params.use_cutmix, cut, mixed)
  y = smooth_one_hot(labels, spec.num_classes, spec.label_smoothing)
  return out, lam * y + (1.0 - lam) * y[::-1]


def mix_batch(key: jax.Array, images: jax.Array, labels: jax.Array, spec: MixSpec
              ) -> tuple[jax.Array, jax.Array]:
  """The step's entry: (images, soft targets [B, C]); only label smoothing when mixing is off."""
  if not spec.enabled:
    return images, smooth_one_hot(labels, spec.num_classes, spec.label_smoothing)
  return apply(images, labels, sample(key, spec, images.shape[1], images.shape[2]), spec)
