"""The tf.data loader's preprocessing, in TensorFlow: decoding, training augmentation and
evaluation crops, all stateless.

Training (`train_preprocess`): RandomResizedCrop as torchvision (the reference; only the crop
window of a JPEG is decoded), the ablation augmentations, normalisation; every random draw is a
stateless op seeded by (seed, process, stream, position). Evaluation (`eval_preprocess`): resize
the short side (antialiased), centre crop, normalise. Each returns the example's dict with
`image`, `valid=True`, `pos`, `label` and `source`; `placeholder` is what a failed one becomes.
The grain loader's twins are in `augment` (numpy / PIL).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

from cjepa_jax.data.lazy_tf import tf
from cjepa_jax.data.spec import DataSpec


# Torchvision's RandomResizedCrop tries this many (scale, ratio) draws before its fallback.
_CROP_ATTEMPTS = 10


# Stream identifiers folded into the seed so each random decision has its own stream.
ORDER, SHUFFLE, AUGMENT, SYNTHETIC = 1, 2, 3, 4


# tf.image.ResizeMethod values (they are these strings).
RESIZE_METHODS = {
    'bilinear': 'bilinear',
    'bicubic': 'bicubic',
    'nearest': 'nearest',
    'area': 'area',
    'lanczos3': 'lanczos3',
}


# ------------------------------------------------------------------------------------------------
# Seeds: stateless, derived from (seed, process, stream, ...) so positions alone fix randomness.
# ------------------------------------------------------------------------------------------------


def seed(base: tf.Tensor, *data) -> tf.Tensor:
  """Folds integers or int64 tensors into a [2] int64 stateless seed."""
  for d in data:
    base = tf.random.experimental.stateless_fold_in(base, tf.cast(d, tf.int64))
  return base


def base_seed(data: DataSpec, process_index: int) -> tf.Tensor:
  return tf.constant([data.seed, process_index], tf.int64)


# ------------------------------------------------------------------------------------------------
# Decoding and the per-example result.
# ------------------------------------------------------------------------------------------------


def placeholder(size: int):
  """Zero image with valid = False, pos = -1, label = -1."""
  return dict(image=tf.zeros([size, size, 3], tf.float32), valid=tf.constant(False),
              pos=tf.constant(-1, tf.int64), label=tf.constant(-1, tf.int32),
              source=tf.constant('', tf.string))


def finish(ex, image):
  return dict(image=tf.cast(image, tf.float32), valid=tf.constant(True), pos=ex['pos'],
              label=tf.cast(ex['label'], tf.int32), source=ex['source'])


def _encoded(ex):
  return ex['encoded'] if 'encoded' in ex else tf.io.read_file(ex['path'])


def _decode(encoded: tf.Tensor) -> tf.Tensor:
  """JPEG / PNG / GIF / BMP bytes -> uint8 [h, w, 3]."""
  return tf.io.decode_image(encoded, channels=3, expand_animations=False)


# ------------------------------------------------------------------------------------------------
# Training preprocessing.
# ------------------------------------------------------------------------------------------------


def train_preprocess(ex, *, data: DataSpec, aug_base):
  """Example -> dict(image=float32 [S, S, 3] normalised, ...), randomness seeded by position."""
  d = data
  seeds = tf.unstack(tf.random.experimental.stateless_split(seed(aug_base, ex['pos']), 5))
  crop_fn = functools.partial(random_resized_crop_window, scale=d.crop_scale, ratio=d.crop_ratio,
                              seed=seeds[0])
  if 'pixels' in ex:  # Synthetic: already an image.
    image = _crop(ex['pixels'], crop_fn)
  else:
    image = _decode_and_crop(_encoded(ex), crop_fn)
  image = tf.image.resize(image, [d.image_size, d.image_size], RESIZE_METHODS[d.interpolation],
                          antialias=True)
  image = tf.clip_by_value(image / 255.0, 0.0, 1.0)  # Bicubic / lanczos overshoot.
  if d.flip:
    image = tf.image.stateless_random_flip_left_right(image, seeds[1])
  if d.color_jitter > 0:
    image = _color_jitter(image, d.color_jitter, seeds[2])
  if d.grayscale > 0:
    image = _random_grayscale(image, d.grayscale, seeds[3])
  if d.blur > 0:
    image = _random_blur(image, d.blur, seeds[4])
  return finish(ex, _normalize(image, data))


def random_resized_crop_window(height: tf.Tensor, width: tf.Tensor, *, scale: Sequence[float],
                               ratio: Sequence[float], seed: tf.Tensor) -> tf.Tensor:
  """Torchvision's RandomResizedCrop.get_params, stateless: int32 [4] = (top, left, h, w).

  Up to 10 draws of area fraction U(scale) and log-aspect U(log ratio); the first whose
  round(sqrt(area * aspect)) x round(sqrt(area / aspect)) fits is placed uniformly. If none fits,
  the centre crop of the whole image with its aspect clamped to `ratio`.
  """
  h = tf.cast(height, tf.float32)
  w = tf.cast(width, tf.float32)
  s_area, s_ratio, s_top, s_left = tf.unstack(tf.random.experimental.stateless_split(seed, 4))
  area = h * w * tf.random.stateless_uniform([_CROP_ATTEMPTS], s_area, scale[0], scale[1])
  log_r = tf.random.stateless_uniform(
      [_CROP_ATTEMPTS], s_ratio, math.log(ratio[0]), math.log(ratio[1]))
  aspect = tf.exp(log_r)
  cw = tf.round(tf.sqrt(area * aspect))  # Round half to even, as Python's round().
  ch = tf.round(tf.sqrt(area / aspect))
  fits = (cw > 0) & (cw <= w) & (ch > 0) & (ch <= h)
  first = tf.argmax(tf.cast(fits, tf.int32))
  in_ratio = w / h
  fb_w = tf.where(in_ratio < ratio[0], w, tf.where(in_ratio > ratio[1], tf.round(h * ratio[1]), w))
  fb_h = tf.where(in_ratio < ratio[0], tf.round(w / ratio[0]), h)
  any_fits = tf.reduce_any(fits)
  ch = tf.where(any_fits, ch[first], fb_h)
  cw = tf.where(any_fits, cw[first], fb_w)
  u_top = tf.random.stateless_uniform([], s_top)
  u_left = tf.random.stateless_uniform([], s_left)
  top = tf.where(any_fits, tf.floor(u_top * (h - ch + 1)), tf.floor((h - ch) / 2))
  left = tf.where(any_fits, tf.floor(u_left * (w - cw + 1)), tf.floor((w - cw) / 2))
  return tf.cast(tf.stack([top, left, ch, cw]), tf.int32)


def _crop(image, crop_fn):
  shape = tf.shape(image)
  top, left, h, w = tf.unstack(crop_fn(shape[0], shape[1]))
  return tf.image.crop_to_bounding_box(image, top, left, h, w)


def _decode_and_crop(encoded, crop_fn):
  """Decodes only the crop window of a JPEG (fast); other formats are decoded then cropped."""

  def jpeg():
    shape = tf.image.extract_jpeg_shape(encoded)
    window = crop_fn(shape[0], shape[1])
    return tf.image.decode_and_crop_jpeg(encoded, window, channels=3,
                                         dct_method='INTEGER_ACCURATE')

  def other():
    return _crop(_decode(encoded), crop_fn)

  return tf.cond(tf.io.is_jpeg(encoded), jpeg, other)


def _normalize(image, data: DataSpec):
  """[0, 1] pixels -> (x - mean) / std per channel."""
  mean = tf.constant(data.mean, tf.float32)
  std = tf.constant(data.std, tf.float32)
  return (image - mean) / std


def _gray(image):
  return tf.image.rgb_to_grayscale(image)  # ITU-R 601 luma, as PIL's convert('L').


def _color_jitter(image, strength: float, seed):
  """With p = 0.8: brightness, contrast, saturation (0.8 s) and hue (0.2 s) jitter.

  The SimCLR / reference `get_color_distortion(s)` recipe, except that the four ops run in a fixed
  order (torchvision shuffles them). Ablations only: off in every reference recipe.
  """
  seeds = tf.unstack(tf.random.experimental.stateless_split(seed, 5))
  b = c = s = 0.8 * strength
  hue = min(0.2 * strength, 0.5)
  f_b = tf.random.stateless_uniform([], seeds[0], max(0.0, 1 - b), 1 + b)
  f_c = tf.random.stateless_uniform([], seeds[1], max(0.0, 1 - c), 1 + c)
  f_s = tf.random.stateless_uniform([], seeds[2], max(0.0, 1 - s), 1 + s)
  d_h = tf.random.stateless_uniform([], seeds[3], -hue, hue)
  out = tf.clip_by_value(image * f_b, 0, 1)
  mean = tf.reduce_mean(_gray(out))
  out = tf.clip_by_value((out - mean) * f_c + mean, 0, 1)
  out = tf.clip_by_value((out - _gray(out)) * f_s + _gray(out), 0, 1)
  out = tf.image.adjust_hue(out, d_h)
  apply = tf.random.stateless_uniform([], seeds[4]) < 0.8
  return tf.where(apply, out, image)


def _random_grayscale(image, p: float, seed):
  apply = tf.random.stateless_uniform([], seed) < p
  return tf.where(apply, tf.tile(_gray(image), [1, 1, 3]), image)


def _random_blur(image, p: float, seed, sigma_range=(0.1, 2.0)):
  """With probability p, a Gaussian blur with sigma ~ U(0.1, 2.0) (the reference GaussianBlur)."""
  s1, s2 = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
  sigma = tf.random.stateless_uniform([], s1, *sigma_range)
  radius = int(math.ceil(3 * sigma_range[1]))
  x = tf.range(-radius, radius + 1, dtype=tf.float32)
  kernel = tf.exp(-0.5 * tf.square(x / sigma))
  kernel /= tf.reduce_sum(kernel)
  padded = tf.pad(image[None], [[0, 0], [radius, radius], [radius, radius], [0, 0]], 'SYMMETRIC')
  k_h = tf.tile(tf.reshape(kernel, [-1, 1, 1, 1]), [1, 1, 3, 1])
  k_w = tf.tile(tf.reshape(kernel, [1, -1, 1, 1]), [1, 1, 3, 1])
  out = tf.nn.depthwise_conv2d(padded, k_h, [1, 1, 1, 1], 'VALID')
  out = tf.nn.depthwise_conv2d(out, k_w, [1, 1, 1, 1], 'VALID')[0]
  apply = tf.random.stateless_uniform([], s2) < p
  return tf.where(apply, out, image)


# ------------------------------------------------------------------------------------------------
# Evaluation preprocessing.
# ------------------------------------------------------------------------------------------------


def eval_preprocess(ex, *, data: DataSpec, resize: int):
  """Example -> dict(image=float32 [S, S, 3] normalised, ...): the short side to `resize`, the
  centre crop of `image_size`; no randomness."""
  image = ex['pixels'] if 'pixels' in ex else _decode(_encoded(ex))  # Synthetic: no bytes.
  image = _resize_short_side(image, resize, RESIZE_METHODS[data.interpolation])
  image = _central_crop(image, data.image_size)
  return finish(ex, _normalize(image / 255.0, data))


def _resize_short_side(image, size: int, method):
  """torchvision Resize(int): short side -> size, long side -> int(size * long / short)."""
  shape = tf.shape(image)
  h = tf.cast(shape[0], tf.float32)
  w = tf.cast(shape[1], tf.float32)
  short = tf.minimum(h, w)
  new_h = tf.where(h <= w, float(size), tf.floor(size * h / short))
  new_w = tf.where(w <= h, float(size), tf.floor(size * w / short))
  return tf.image.resize(image, tf.cast(tf.stack([new_h, new_w]), tf.int32), method,
                         antialias=True)


def _central_crop(image, size: int):
  """torchvision CenterCrop: offsets int(round((H - size) / 2)); then clip to [0, 255]."""
  shape = tf.shape(image)
  top = tf.cast(tf.round(tf.cast(shape[0] - size, tf.float32) / 2), tf.int32)
  left = tf.cast(tf.round(tf.cast(shape[1] - size, tf.float32) / 2), tf.int32)
  image = tf.image.crop_to_bounding_box(image, top, left, size, size)
  return tf.clip_by_value(image, 0.0, 255.0)
