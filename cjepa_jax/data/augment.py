"""The grain loader's preprocessing, numpy / PIL: training augmentation and evaluation crops.

Training (`train_transform`): torchvision's RandomResizedCrop (the reference), then the ablation
augmentations (flip, colour jitter, grayscale, blur; off in every reference recipe), then
normalisation. Its randomness is a function of (seed, global position) alone. Evaluation
(`eval_transform`): resize the short side, centre crop, normalise. The tf.data loader's twins are
in `tf_augment`; the two draw different random numbers for the same seed.
"""

from __future__ import annotations

import dataclasses
import io
import math
from collections.abc import Sequence
from typing import Any

import numpy as np
from PIL import Image

from cjepa_jax.data.spec import DataSpec


# Stream id folded into the augmentation seeds (each random decision has its own stream).
_AUGMENT = 3


_CROP_ATTEMPTS = 10


RESAMPLE = {'bilinear': Image.BILINEAR, 'bicubic': Image.BICUBIC, 'nearest': Image.NEAREST,
             'area': Image.BOX, 'lanczos3': Image.LANCZOS}


def random_resized_crop_window(height: int, width: int, rng: np.random.Generator, *,
                               scale: Sequence[float], ratio: Sequence[float]
                               ) -> tuple[int, int, int, int]:
  """Torchvision's RandomResizedCrop.get_params: (top, left, h, w).

  Up to 10 draws of area fraction U(scale) and log-aspect U(log ratio); the first whose
  round(sqrt(area * aspect)) x round(sqrt(area / aspect)) fits is placed uniformly. If none fits,
  the centre crop of the whole image with its aspect clamped to `ratio`. The draws are made all
  at once (a fixed number per example), as the tf.data version.

  Args:
    height, width: the image's size.
    rng: the example's generator; this uses its next 2 * 10 + 2 uniforms.
    scale: area fraction range.
    ratio: aspect (width / height) range.
  """
  # One draw of all the uniforms (a fixed count per example), then plain Python arithmetic: a
  # dozen tiny numpy operations would cost more than decoding a CIFAR image.
  u = rng.random(2 * _CROP_ATTEMPTS + 2).tolist()
  log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
  for k in range(_CROP_ATTEMPTS):
    area = height * width * (scale[0] + (scale[1] - scale[0]) * u[k])
    aspect = math.exp(log_lo + (log_hi - log_lo) * u[_CROP_ATTEMPTS + k])
    w = round(math.sqrt(area * aspect))  # Round half to even, as torchvision's round().
    h = round(math.sqrt(area / aspect))
    if 0 < w <= width and 0 < h <= height:
      return (int(u[-2] * (height - h + 1)), int(u[-1] * (width - w + 1)), h, w)
  in_ratio = width / height
  if in_ratio < ratio[0]:
    w, h = width, int(round(width / ratio[0]))
  elif in_ratio > ratio[1]:
    w, h = int(round(height * ratio[1])), height
  else:
    w, h = width, height
  return (height - h) // 2, (width - w) // 2, h, w


def _open(ex: dict[str, Any]) -> Image.Image:
  """The example's image as an RGB PIL image (decoded from bytes, or from uint8 pixels)."""
  if 'pixels' in ex:
    return Image.fromarray(ex['pixels'])
  image = Image.open(io.BytesIO(ex['encoded']))
  image.load()  # Decode now: a truncated or corrupt file raises here, inside the example's try.
  return image if image.mode == 'RGB' else image.convert('RGB')


@dataclasses.dataclass(frozen=True)
class Preprocess:
  """The preprocessing parameters of a `DataSpec`, as the per-example functions use them (the
  resample filter looked up, mean and std as arrays: they run ~10^3 times a second per core)."""
  image_size: int
  crop_scale: tuple[float, float]
  crop_ratio: tuple[float, float]
  resample: int
  flip: bool
  color_jitter: float
  grayscale: float
  blur: float
  mean: np.ndarray  # float32 [3]
  std: np.ndarray   # float32 [3]

  @classmethod
  def from_spec(cls, data: DataSpec) -> Preprocess:
    return cls(int(data.image_size), tuple(data.crop_scale), tuple(data.crop_ratio),
               RESAMPLE[data.interpolation], bool(data.flip), float(data.color_jitter),
               float(data.grayscale), float(data.blur), np.asarray(data.mean, np.float32),
               np.asarray(data.std, np.float32))


def train_transform(ex: dict[str, Any], seed: int, position: int, pp: Preprocess) -> np.ndarray:
  """Decoded example -> [S, S, 3]: RandomResizedCrop, then the ablation augmentations.

  All randomness comes from generators seeded by (seed, position): the crop and the flip from
  the first, colour jitter and blur from their own (so switching one on changes no other draw).
  The crop is cut out, then resized (PIL antialiases, as tf.image.resize with antialias=True;
  `resize(box=...)` would filter across the box edges, unlike the tf.data crop).

  Returns:
    float32 [S, S, 3], normalised: (x / 255 - mean) / std.
  """
  rng = np.random.default_rng([seed, _AUGMENT, position])
  image = _open(ex)
  top, left, h, w = random_resized_crop_window(image.height, image.width, rng,
                                               scale=pp.crop_scale, ratio=pp.crop_ratio)
  size = pp.image_size
  image = image.crop((left, top, left + w, top + h)).resize((size, size), pp.resample)
  x = np.asarray(image)
  u_flip, u_gray = rng.random(2)
  if pp.flip and u_flip < 0.5:
    x = x[:, ::-1]
  x = x.astype(np.float32)
  x /= np.float32(255.0)
  if pp.color_jitter > 0:
    x = _color_jitter(x, pp.color_jitter, np.random.default_rng([seed, _AUGMENT, position, 1]))
  if pp.grayscale > 0 and u_gray < pp.grayscale:
    x = np.repeat(_gray(x), 3, axis=-1)
  if pp.blur > 0:
    x = _random_blur(x, pp.blur, np.random.default_rng([seed, _AUGMENT, position, 2]))
  return normalize(x, pp)


def eval_transform(ex: dict[str, Any], pp: Preprocess, resize: int) -> np.ndarray:
  """Decoded example -> float32 [S, S, 3] normalised: short side -> `resize` (torchvision
  Resize(int)), then the centre crop (offsets round((H - S) / 2), as torchvision CenterCrop)."""
  image = _open(ex)
  w, h = image.size
  short = min(h, w)
  new_h = resize if h <= w else int(resize * h / short)
  new_w = resize if w <= h else int(resize * w / short)
  image = image.resize((new_w, new_h), pp.resample)
  size = pp.image_size
  top, left = int(round((new_h - size) / 2)), int(round((new_w - size) / 2))
  x = np.asarray(image.crop((left, top, left + size, top + size))).astype(np.float32)
  x /= np.float32(255.0)
  return normalize(x, pp)


def normalize(x: np.ndarray, pp: Preprocess) -> np.ndarray:
  """float32 [S, S, 3] in [0, 1] -> (x - mean) / std, in place.

  Per example, while its pixels are in cache: over a whole 224 px batch (77 MB of float32 for
  128 images) each pass would stream through memory, and cost half as much as decoding.
  """
  x = np.ascontiguousarray(x, np.float32)
  x -= pp.mean
  x /= pp.std
  return x


def _gray(x: np.ndarray) -> np.ndarray:
  return (x @ np.asarray([0.2989, 0.587, 0.114], np.float32))[..., None]  # ITU-R 601 luma.


def _color_jitter(x: np.ndarray, strength: float, rng: np.random.Generator) -> np.ndarray:
  """With p = 0.8: brightness, contrast, saturation (0.8 s), hue (0.2 s), in a fixed order."""
  from matplotlib import colors  # pylint: disable=g-import-not-at-top  (ablations only)
  b = 0.8 * strength
  hue = min(0.2 * strength, 0.5)
  f_b, f_c, f_s = rng.uniform(max(0.0, 1 - b), 1 + b, 3)
  d_h = rng.uniform(-hue, hue)
  if rng.random() >= 0.8:
    return x
  out = np.clip(x * f_b, 0, 1)
  mean = _gray(out).mean()
  out = np.clip((out - mean) * f_c + mean, 0, 1)
  out = np.clip((out - _gray(out)) * f_s + _gray(out), 0, 1)
  hsv = colors.rgb_to_hsv(out)
  hsv[..., 0] = (hsv[..., 0] + d_h) % 1.0
  return colors.hsv_to_rgb(hsv).astype(np.float32)


def _random_blur(x: np.ndarray, p: float, rng: np.random.Generator,
                 sigma_range: tuple[float, float] = (0.1, 2.0)) -> np.ndarray:
  """With probability p, a separable Gaussian blur, sigma ~ U(0.1, 2.0), symmetric padding."""
  sigma = rng.uniform(*sigma_range)
  if rng.random() >= p:
    return x
  radius = int(np.ceil(3 * sigma_range[1]))
  taps = np.exp(-0.5 * (np.arange(-radius, radius + 1) / sigma) ** 2)
  taps /= taps.sum()
  padded = np.pad(x, ((radius, radius), (radius, radius), (0, 0)), mode='symmetric')
  h, w = x.shape[:2]
  rows = sum(t * padded[k:k + h] for k, t in enumerate(taps))
  return sum(t * rows[:, k:k + w] for k, t in enumerate(taps)).astype(np.float32)
