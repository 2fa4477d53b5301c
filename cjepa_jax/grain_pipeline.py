"""TensorFlow-free input: grain over random-access sources, numpy / PIL preprocessing.

Selected by `config.data.loader = 'grain'`; `input_pipeline`'s public functions dispatch here, so
callers are the same for both loaders. Nothing here imports TensorFlow.

Sources (`config.data.dataset`), all random access (`len`, `[i]`):
  * 'image_folder': `data_dir/<split>/<class>/<image>` (the listing of `input_pipeline`).
  * 'array_record': `data_dir/*<split>.array_record*` shards of serialized tf.train.Example
    records ('image': encoded bytes, 'label': int64), the layout of a tfds dataset prepared with
    `--file_format=array_record` (point data_dir at its version folder) and of
    `cjepa_jax.array_record.convert_image_folder`; class names from `label.labels.txt`.
  * any tfds name: `tfds.data_source(name, split, data_dir=...)` (prepared as ArrayRecord).
  * 'synthetic': numpy noise images, a function of (seed, split, example id).

Training order: a global shuffle. Global position g (step s holds [s*B, (s+1)*B), B the global
batch) reads example perm_e[g - e*N] of the whole split (N examples, e = g // N), perm_e a
permutation seeded by (seed, e). Process p takes positions [s*B + p*b, s*B + (p+1)*b) of step s
(b = B / process_count). The augmentation of position g is seeded by (seed, g). So the batch of a
step is a function of (seed, step) alone, whatever the number of processes or worker threads, and
resuming at step s is a jump, not a skip (O(1), no iterator state in the checkpoint).

Corrupt images keep their slot: a placeholder marked invalid, replaced on the host by another
image of the batch and counted in `data_skipped`, as with the tf.data loader.
"""

from __future__ import annotations

import dataclasses
import functools
import glob
import io
import json
import math
import os
import threading
import zlib
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from absl import logging
import ml_collections
import numpy as np
from PIL import Image

# Stream ids folded into seeds (each random decision has its own stream).
_ORDER, _AUGMENT, _SYNTHETIC = 1, 3, 4
_CROP_ATTEMPTS = 10
_RESAMPLE = {'bilinear': Image.BILINEAR, 'bicubic': Image.BICUBIC, 'nearest': Image.NEAREST,
             'area': Image.BOX, 'lanczos3': Image.LANCZOS}
# Positions are int64; an epoch count this large is never reached.
_STREAM_END = 2 ** 62
MISSING_TFDS = (
    'A tfds dataset name in config.data.dataset needs tensorflow_datasets, which is not '
    "installed: pip install -e '.[tf]'; or, without it, read the dataset prepared as ArrayRecord "
    '(tfds build <name> --file_format=array_record) with --config.data.dataset=array_record '
    '--config.data.data_dir=<data_dir>/<name>/<version>.')


# ------------------------------------------------------------------------------------------------
# Sources.
# ------------------------------------------------------------------------------------------------


class ImageFolderSource:
  """Random access to `paths` / `labels`: [i] -> dict(encoded=bytes, label, source)."""

  def __init__(self, paths: Sequence[str], labels: Sequence[int]):
    self._paths, self._labels = list(paths), np.asarray(labels, np.int64)

  def __len__(self) -> int:
    return len(self._paths)

  def __getitem__(self, i: int) -> dict[str, Any]:
    path = self._paths[i]
    with open(path, 'rb') as f:
      return dict(encoded=f.read(), label=int(self._labels[i]), source=path)


class ArrayRecordSource:
  """Random access to tf.train.Example records of ArrayRecord shards ('image', 'label')."""

  def __init__(self, files: Sequence[str]):
    import grain.python as grain  # pylint: disable=g-import-not-at-top  (only when used)
    self._files = list(files)
    self._source = grain.ArrayRecordDataSource(self._files)

  def __len__(self) -> int:
    return len(self._source)

  def __getitem__(self, i: int) -> dict[str, Any]:
    features = parse_example(self._source[i])
    return dict(encoded=features['image'][0], label=int(features['label'][0]),
                source=f'array_record:{i}')


class TfdsSource:
  """`tfds.data_source` (a tfds dataset prepared as ArrayRecord), images left encoded."""

  def __init__(self, name: str, split: str, data_dir: str | None):
    try:
      import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top  (an extra)
    except ImportError as e:
      raise ValueError(MISSING_TFDS) from e
    try:
      self._source = tfds.data_source(name, split=split, data_dir=data_dir,
                                      decoders={'image': tfds.decode.SkipDecoding()})
    except Exception as e:  # tfds raises several types for "not prepared / not array_record".
      raise ValueError(
          f'tfds dataset {name!r} split {split!r} cannot be read as a random-access ArrayRecord '
          f'source under {data_dir or "the default data_dir"} ({type(e).__name__}: '
          f'{str(e).splitlines()[0] if str(e) else ""}); prepare it with `tfds build {name} '
          f'--data_dir=<data_dir> --file_format=array_record`, or use '
          "--config.data.loader=tf.") from e
    self._name = name

  def __len__(self) -> int:
    return len(self._source)

  def __getitem__(self, i: int) -> dict[str, Any]:
    ex = self._source[i]
    image = ex['image']
    key = 'encoded' if isinstance(image, bytes) else 'pixels'
    return {key: image if key == 'encoded' else np.asarray(image, np.uint8),
            'label': int(ex['label']), 'source': f'{self._name}:{i}'}


class SyntheticSource:
  """`size` uint8 noise images [S, S, 3] with labels, a function of (seed, split, id)."""

  def __init__(self, config: ml_collections.ConfigDict, split: str, size: int):
    self._seed, self._split = int(config.seed), zlib.crc32(split.encode())
    self._image_size, self._classes, self._size = (int(config.data.image_size),
                                                   int(config.data.num_classes), size)

  def __len__(self) -> int:
    return self._size

  def __getitem__(self, i: int) -> dict[str, Any]:
    rng = np.random.default_rng([self._seed, self._split, _SYNTHETIC, int(i)])
    s = self._image_size
    return dict(pixels=rng.integers(0, 256, (s, s, 3), dtype=np.uint8),
                label=int(rng.integers(0, self._classes)), source=f'synthetic:{i}')


def array_record_files(data_dir: str, split: str) -> list[str]:
  """The sorted shards `data_dir/*<split>.array_record*` (tfds and converter naming)."""
  files = sorted(f for f in glob.glob(os.path.join(data_dir, f'*{split}.array_record*'))
                 if os.path.basename(f).split('.array_record')[0].split('-')[-1] == split)
  if not files:
    raise ValueError(
        f'No ArrayRecord shards of split {split!r} in {data_dir!r} (expected '
        f'<name>-{split}.array_record-00000-of-000NN); convert an image folder with `python -m '
        'cjepa_jax.array_record --src=<folder> --dst=<data_dir>` or prepare a tfds dataset with '
        '`tfds build <name> --file_format=array_record` and point data_dir at its version folder.')
  return files


def array_record_class_names(data_dir: str) -> list[str]:
  """Class names of an ArrayRecord dataset, in label order.

  `label.labels.txt` (one a line; the converter writes it, and tfds for a ClassLabel with names),
  else a tfds `features.json` whose 'label' ClassLabel has only a class count (names '0', '1',
  ..., as tfds names them).
  """
  path = os.path.join(data_dir, 'label.labels.txt')
  if os.path.exists(path):
    with open(path, encoding='utf-8') as f:
      return [line.rstrip('\n') for line in f if line.strip()]
  features = os.path.join(data_dir, 'features.json')
  if os.path.exists(features):
    with open(features, encoding='utf-8') as f:
      label = json.load(f).get('featuresDict', {}).get('features', {}).get('label', {})
    if 'classLabel' in label:
      return [str(i) for i in range(int(label['classLabel']['numClasses']))]
  raise ValueError(f'{path} is missing: it lists the class names in label order (the converter '
                   'and tfds write it); write one class name per line.')


# ------------------------------------------------------------------------------------------------
# tf.train.Example wire format, without TensorFlow (only what image classification needs).
# ------------------------------------------------------------------------------------------------


def _varint(value: int) -> bytes:
  value &= (1 << 64) - 1  # Negative int64 as two's complement, as protobuf.
  out = bytearray()
  while True:
    byte = value & 0x7F
    value >>= 7
    if value:
      out.append(byte | 0x80)
    else:
      out.append(byte)
      return bytes(out)


def _field(number: int, payload: bytes) -> bytes:
  return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def serialize_example(features: dict[str, Sequence[bytes] | Sequence[int]]) -> bytes:
  """dict(name -> list of bytes | list of ints) -> a serialized tf.train.Example."""
  entries = b''
  for name, values in features.items():
    if all(isinstance(v, bytes) for v in values):
      feature = _field(1, b''.join(_field(1, v) for v in values))  # BytesList.
    else:
      feature = _field(3, _field(1, b''.join(_varint(int(v)) for v in values)))  # Int64List.
    entries += _field(1, _field(1, name.encode()) + _field(2, feature))
  return _field(1, entries)


def _read_varint(buf: bytes, i: int) -> tuple[int, int]:
  value = shift = 0
  while True:
    byte = buf[i]
    i += 1
    value |= (byte & 0x7F) << shift
    shift += 7
    if not byte & 0x80:
      return value, i


def _fields(buf: bytes) -> Iterator[tuple[int, int, Any]]:
  """(field number, wire type, value) of a protobuf message; length-delimited values as bytes."""
  i = 0
  while i < len(buf):
    key, i = _read_varint(buf, i)
    number, wire = key >> 3, key & 7
    if wire == 0:
      value, i = _read_varint(buf, i)
    elif wire == 2:
      n, i = _read_varint(buf, i)
      value, i = buf[i:i + n], i + n
    elif wire == 1:
      value, i = buf[i:i + 8], i + 8
    elif wire == 5:
      value, i = buf[i:i + 4], i + 4
    else:
      raise ValueError(f'Not a tf.train.Example record (protobuf wire type {wire}).')
    yield number, wire, value


def parse_example(record: bytes) -> dict[str, list]:
  """A serialized tf.train.Example -> dict(name -> list of bytes | ints | float32 arrays)."""
  out = {}
  for _, _, features in _fields(record):
    for _, _, entry in _fields(features):
      name, feature = b'', b''
      for number, _, value in _fields(entry):
        if number == 1:
          name = value
        else:
          feature = value
      for kind, _, values in _fields(feature):
        if kind == 1:  # BytesList.
          out[name.decode()] = [v for _, _, v in _fields(values)]
        elif kind == 2:  # FloatList (packed or not).
          chunks = [v if w == 2 else v for _, w, v in _fields(values)]
          out[name.decode()] = list(np.frombuffer(b''.join(chunks), '<f4'))
        elif kind == 3:  # Int64List (packed or not).
          ints = []
          for _, wire, v in _fields(values):
            if wire == 0:
              ints.append(v)
            else:
              j = 0
              while j < len(v):
                x, j = _read_varint(v, j)
                ints.append(x)
          out[name.decode()] = [x - (1 << 64) if x >> 63 else x for x in ints]
  return out


# ------------------------------------------------------------------------------------------------
# Per-example preprocessing (pure: numpy / PIL, randomness from a numpy Generator).
# ------------------------------------------------------------------------------------------------


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
  """The preprocessing parameters, read once from `config.data` (plain values: the per-example
  functions run ~10^3 times a second per core, where ConfigDict look-ups would show)."""
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
  def from_config(cls, data: ml_collections.ConfigDict) -> Preprocess:
    return cls(int(data.image_size), tuple(data.crop_scale), tuple(data.crop_ratio),
               _RESAMPLE[data.interpolation], bool(data.flip), float(data.color_jitter),
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


# ------------------------------------------------------------------------------------------------
# Orders.
# ------------------------------------------------------------------------------------------------


class EpochPermutation:
  """g -> the example read at global position g: perm_{g // n}[g % n], perm_e seeded (seed, e).

  Thread-safe; keeps the last two epochs' permutations (a batch may straddle an epoch boundary).
  """

  def __init__(self, seed: int, n: int):
    self._seed, self._n = int(seed), int(n)
    self._cache: dict[int, np.ndarray] = {}
    self._lock = threading.Lock()

  def _perm(self, epoch: int) -> np.ndarray:
    with self._lock:
      perm = self._cache.get(epoch)
      if perm is None:
        perm = np.random.default_rng([self._seed, _ORDER, epoch]).permutation(self._n)
        perm = perm.astype(np.int64 if self._n >= 2 ** 31 else np.int32)
        self._cache = {e: p for e, p in self._cache.items() if e == epoch - 1}
        self._cache[epoch] = perm
      return perm

  def __call__(self, g: int) -> int:
    epoch, offset = divmod(int(g), self._n)
    return int(self._perm(epoch)[offset])


def local_to_global(k: int, *, local_batch: int, process_index: int, process_count: int) -> int:
  """Element k of a process's stream -> global position (step k // b, slot p * b + k % b)."""
  step, slot = divmod(int(k), local_batch)
  return step * local_batch * process_count + process_index * local_batch + slot


# ------------------------------------------------------------------------------------------------
# Pipelines.
# ------------------------------------------------------------------------------------------------


def _threads(data: ml_collections.ConfigDict) -> int:
  workers = int(data.get('workers', 0))
  if workers > 0:
    return workers
  cores = len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else os.cpu_count()
  return 2 * (cores or 1)  # PIL decodes and resizes without the GIL.


def _placeholder(size: int) -> dict[str, Any]:
  return dict(image=np.zeros((size, size, 3), np.float32), label=np.int32(-1),
              valid=np.bool_(False), pos=np.int64(-1), source='')


def _safe(fn: Callable[[dict[str, Any]], np.ndarray], ex: dict[str, Any], pos: int,
          size: int) -> dict[str, Any]:
  """fn(ex) as a valid example, or (any failure: corrupt or unreadable image) a placeholder."""
  try:
    image = fn(ex)
    return dict(image=image, label=np.int32(ex['label']), valid=np.bool_(True),
                pos=np.int64(pos), source=ex['source'])
  except Exception as e:  # pylint: disable=broad-except  (any bad image keeps its slot)
    out = _placeholder(size)
    out['source'] = f'{ex.get("source", pos)} ({type(e).__name__}: {e})'
    return out


def _read(source, index: int) -> dict[str, Any]:
  """source[index], or a stub that fails in preprocessing (an unreadable file keeps its slot)."""
  try:
    return source[index]
  except Exception as e:  # pylint: disable=broad-except
    return dict(encoded=b'', label=-1, source=f'{index} (read failed: {e})')


def _collate(examples: Sequence[dict[str, Any]]) -> dict[str, Any]:
  """Examples -> a batch (invalid slots hold the placeholder's zero image)."""
  return dict(image=np.stack([e['image'] for e in examples]),
              label=np.asarray([e['label'] for e in examples], np.int32),
              valid=np.asarray([e['valid'] for e in examples], bool),
              pos=np.asarray([e['pos'] for e in examples], np.int64),
              source=[e['source'] for e in examples])


def _parallel_batches(fn: Callable[[int], dict[str, Any]], start: int, stop: int,
                      batch: int, data: ml_collections.ConfigDict) -> Iterator[dict[str, Any]]:
  """Batches of fn(k) for k in [start, stop), in order: batch j holds k = start + j * batch, ...

  grain maps whole batches (a MapDataset over batch numbers), several at once on its reader
  threads, and yields them in order. Per batch, not per example: one grain element per batch
  keeps grain's per-element bookkeeping off the critical path (it costs as much as decoding a
  CIFAR image), and PIL decodes and resizes without the GIL, so the threads run in parallel.
  """
  import grain.python as grain  # pylint: disable=g-import-not-at-top  (only when used)

  def make(j):
    first = start + j * batch
    return _collate([fn(k) for k in range(first, first + batch)])

  ds = grain.MapDataset.range(0, (stop - start) // batch).map(make)
  threads = _threads(data)
  ds = ds.to_iter_dataset(grain.ReadOptions(
      num_threads=threads, prefetch_buffer_size=threads + max(0, int(data.prefetch))))
  return iter(ds)


def _fill_invalid(x: np.ndarray, valid: np.ndarray) -> np.ndarray:
  """Slots with valid = False take, in turn, the values of the valid slots (static batch size)."""
  if valid.all() or not valid.any():
    return x
  good, bad = np.flatnonzero(valid), np.flatnonzero(~valid)
  x = x.copy()
  x[bad] = x[good[np.arange(bad.size) % good.size]]
  return x


def train_batches(source, config: ml_collections.ConfigDict, *, start_step: int,
                  local_batch: int, process_index: int, process_count: int,
                  infinite_source: bool = False) -> Iterator[dict[str, Any]]:
  """Host-local training batches from step `start_step` on (see the module docstring).

  Yields dict(image=float32 [b, S, S, 3], label=int32 [b], data_skipped=int).
  """
  data = config.data
  order = None if infinite_source else EpochPermutation(config.seed, len(source))
  to_global = functools.partial(local_to_global, local_batch=local_batch,
                                process_index=process_index, process_count=process_count)
  pp = Preprocess.from_config(data)
  seed = int(config.seed)

  def example(k):
    g = to_global(k)
    ex = _read(source, g if order is None else order(g))
    return _safe(lambda e: train_transform(e, seed, g, pp), ex, g, pp.image_size)

  skipped = 0
  for batch in _parallel_batches(example, start_step * local_batch, _STREAM_END, local_batch,
                                 data):
    valid = batch['valid']
    if not valid.all():
      skipped += int((~valid).sum())
      logging.warning('Input pipeline: skipped %d undecodable image(s) (%d so far): %s',
                      int((~valid).sum()), skipped,
                      ', '.join(s for s, v in zip(batch['source'], valid) if not v)[:500])
    yield dict(image=_fill_invalid(batch['image'], valid),
               label=_fill_invalid(batch['label'], valid), data_skipped=skipped)


def eval_batches(source, config: ml_collections.ConfigDict, index: np.ndarray, *, total: int,
                 resize: int, local_batch: int, process_count: int
                 ) -> Iterator[dict[str, Any]]:
  """One pass over `index` (this process's split positions), padded to the common batch count.

  Yields dict(image [b, S, S, 3], label [b], valid [b], pos int32 [b] (-1 on padding),
  data_skipped).
  """
  data = config.data
  pp = Preprocess.from_config(data)
  per_process = -(-total // process_count)  # ceil: the process with the most examples.
  steps = -(-per_process // local_batch)     # The same number of batches on every process.

  def example(k):
    if k >= len(index):
      return _placeholder(pp.image_size)
    pos = int(index[k])
    return _safe(lambda e: eval_transform(e, pp, resize), _read(source, pos), pos, pp.image_size)

  skipped = 0
  for batch in _parallel_batches(example, 0, steps * local_batch, local_batch, data):
    failed = [s for s, v, p in zip(batch['source'], batch['valid'], batch['pos']) if not v and s]
    if failed:
      skipped += len(failed)
      logging.warning('Input pipeline: skipped %d undecodable image(s) (%d so far): %s',
                      len(failed), skipped, ', '.join(failed)[:500])
    yield dict(image=batch['image'], label=batch['label'], valid=batch['valid'],
               pos=batch['pos'].astype(np.int32), data_skipped=skipped)

