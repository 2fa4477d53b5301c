"""Input pipelines: tf.data or grain over tfds, a plain image folder, or synthetic images.

Two loaders (`config.data.loader`), behind the same public functions:
  * 'tf': tf.data (this module; the only TensorFlow user of the package, imported on first use).
  * 'grain': grain over random-access sources with numpy / PIL preprocessing and a global
    shuffle (`grain_pipeline`); no TensorFlow. It also reads 'array_record' datasets.
Both hand host-local numpy batches to the trainer, which places them on the devices with
`to_global_array`. What follows describes the tf.data loader; see `grain_pipeline` for grain.

Sources (`config.data.dataset`):
  * any tfds name ('imagenet2012', 'imagenet2012_subset/1pct', 'cifar10', ...), read from
    `config.data.data_dir` with `tfds.builder(name, data_dir=...)`; never downloads.
  * 'image_folder': `data_dir/<split>/<label>/<image>`; class names sorted -> label ids 0..C-1.
  * 'synthetic': random images and labels made in TensorFlow from the seed; no files.
`class_names(config, split)` gives the class of each label id; `check_label_splits(config)` (the
probes call it) refuses train / eval splits whose classes differ, so label ids never silently mean
different classes.

Training (`make_train_iterator`): each process reads its own disjoint part of the split (tfds:
`tfds.split_for_jax_process`; image folder: files `process_index::process_count` of the sorted
list), in an order fixed per epoch by (seed, epoch, process), decodes, RandomResizedCrop as
torchvision (the reference), optional ablation augmentations, ImageNet normalisation, batches of
`batch_size // process_count` and prefetches.

Determinism and exact resumption. The stream of a process is a sequence of examples with
positions 0, 1, 2, ...; epoch e holds positions [e*n, (e+1)*n) of its n local examples, and step s
is positions [s*b, (s+1)*b) with b the local batch. Everything is a function of (seed, process,
position):
  * the order of epoch e is a fresh stateless permutation seeded by (seed, process, e): for an
    image folder a full permutation of the local files; for tfds a random interleave of 32
    contiguous chunks of the local split, then a shuffle buffer seeded by (seed, process, e);
  * the augmentations of the example at position p are stateless ops seeded by
    (seed, process, p);
  * a corrupt or unreadable image keeps its position: it comes out as a placeholder marked
    invalid, and the host fills its slot with a copy of another image of the same batch and counts
    it (`data_skipped`). Dropping it (plain `ignore_errors`) would shift every later batch and break
    resumption.
So resuming at step s only needs s: the pipeline starts at epoch (s*b) // n and skips (s*b) % n
elements of that epoch. The skip runs on file names (image folder) or on the encoded records
before any decoding (tfds; it reads at most one epoch of records). The alternative,
checkpointing the tf.data iterator, would store the shuffle buffer (about 1 GB of JPEG bytes per
host for ImageNet) in every checkpoint.

Evaluation (`make_eval_iterator`): resize the short side, centre-crop `image_size`, normalise, one
pass in file order, the last batch padded with `valid = False`, and the same number of batches on
every process.
"""

from __future__ import annotations

import functools
import importlib
import math
import os
import sys
import zlib
from collections.abc import Iterator, Sequence
from typing import Any

from absl import logging
import jax
import ml_collections
import numpy as np

from cjepa_jax import grain_pipeline


class MissingDependencyError(ImportError, ValueError):
  """The tf.data loader's TensorFlow is not installed (a ValueError: a one-line user error)."""


class _LazyModule:
  """A module imported on first attribute access: the grain loader never imports TensorFlow.

  Importing TensorFlow takes ~10 s and, on GPU hosts, must be followed by hiding the GPUs from it
  (JAX owns them), which is done here right after the import.
  """

  def __init__(self, name: str):
    self._name = name
    self._module = None

  def __getattr__(self, attr: str) -> Any:
    if self._module is None:
      try:
        module = importlib.import_module(self._name)
      except ImportError as e:
        raise MissingDependencyError(missing_tf_text(self._name)) from e
      if self._name == 'tensorflow':  # First use here, whoever imported it before.
        _hide_gpus(module)
      self._module = module
    return getattr(self._module, attr)


def missing_tf_text(module: str) -> str:
  """The one-line error for a missing TensorFlow (`module` 'tensorflow') or tfds."""
  if module == 'tensorflow':
    return ("config.data.loader='tf' needs tensorflow, which is not installed: pip install -e "
            "'.[tf]' (or pip install tensorflow-cpu tensorflow-datasets), or use the grain loader "
            '(--config.data.loader=grain).')
  return grain_pipeline.MISSING_TFDS


tf = _LazyModule('tensorflow')
tfds = _LazyModule('tensorflow_datasets')

LOADERS = ('tf', 'grain')

IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.bmp', '.gif')
# tfds training reads the local split as this many contiguous chunks, interleaved at random per
# epoch (a per-epoch "file shuffle" whose state is a function of the epoch number alone).
TFDS_READ_CHUNKS = 32
# Size of every split of the 'synthetic' dataset except the training split, whose size is
# `config.data.num_train_examples`.
SYNTHETIC_EVAL_EXAMPLES = 10_000
# Torchvision's RandomResizedCrop tries this many (scale, ratio) draws before its fallback.
_CROP_ATTEMPTS = 10
# Stream identifiers folded into the seed so each random decision has its own stream.
_ORDER, _SHUFFLE, _AUGMENT, _SYNTHETIC = 1, 2, 3, 4

def hide_accelerators_from_tf() -> None:
  """Keeps TensorFlow off the GPUs (it feeds the host; JAX owns the accelerators).

  Called by the entry points' `main` before any input is built (not at import). If TensorFlow is
  not imported yet this does nothing: the tf.data loader imports it on first use and hides the
  GPUs from it then (and the grain loader never imports it).
  """
  if isinstance(sys.modules.get('tensorflow'), type(sys)):
    _hide_gpus(sys.modules['tensorflow'])


def _hide_gpus(tf_module) -> None:
  try:
    tf_module.config.set_visible_devices([], 'GPU')
  except RuntimeError:  # TensorFlow already initialised its devices: too late, and harmless on CPU.
    pass


# tf.image.ResizeMethod values (they are these strings).
_RESIZE_METHODS = {
    'bilinear': 'bilinear',
    'bicubic': 'bicubic',
    'nearest': 'nearest',
    'area': 'area',
    'lanczos3': 'lanczos3',
}


# ------------------------------------------------------------------------------------------------
# Public API.
# ------------------------------------------------------------------------------------------------


def make_train_iterator(
    config: ml_collections.ConfigDict,
    *,
    start_step: int = 0,
    process_index: int | None = None,
    process_count: int | None = None,
) -> Iterator[dict[str, Any]]:
  """Infinite iterator of host-local training batches, starting at step `start_step`.

  Args:
    config: the run config (`config.data.*`, `config.batch_size` = global batch, `config.seed`).
    start_step: the first step to produce; batch k of the iterator is the batch of step
      `start_step + k`, identical to an uninterrupted run's.
    process_index: this process (default `jax.process_index()`).
    process_count: the number of processes (default `jax.process_count()`).

  Yields:
    dict(image=float32 [b, H, W, 3] normalised, label=int32 [b],
         data_skipped=int: corrupt/unreadable images replaced so far by this iterator),
    with b = batch_size // process_count and H = W = config.data.image_size.
  """
  process_index, process_count = _process(process_index, process_count)
  local_batch = _local_batch(config.batch_size, process_count)
  _check_data_config(config)
  it = _train_iterator(config, start_step, local_batch, process_index, process_count)
  # Once per run (the trainers build one training iterator): whether anything imported TensorFlow.
  logging.info('Input pipeline: loader=%s, tensorflow_imported=%s', _loader(config),
               isinstance(sys.modules.get('tensorflow'), type(sys)))
  return it


def _train_iterator(config, start_step, local_batch, process_index, process_count):
  if _loader(config) == 'grain':
    if config.data.dataset == 'synthetic':  # An endless stream: global position = example id.
      source = grain_pipeline.SyntheticSource(config, config.data.train_split, 2 ** 62)
    else:
      source = _grain_source(config, config.data.train_split)
      if not len(source):  # pylint: disable=g-explicit-length-test
        raise ValueError(f'Split {config.data.train_split!r} of {config.data.dataset!r} has no '
                         'examples; use a split with data.')
    return grain_pipeline.train_batches(
        source, config, start_step=start_step, local_batch=local_batch,
        process_index=process_index, process_count=process_count,
        infinite_source=config.data.dataset == 'synthetic')
  ds = _train_source(config, start_step * local_batch, process_index, process_count)
  preprocess = functools.partial(_train_preprocess, config=config,
                                 aug_base=_seed(_base_seed(config, process_index), _AUGMENT))
  ds = _decode_batches(ds, preprocess, config.data.image_size, local_batch)
  return _host_batches(ds.prefetch(config.data.prefetch), fill_invalid=True)


def make_eval_iterator(
    config: ml_collections.ConfigDict,
    split: str,
    *,
    batch_size: int,
    process_index: int | None = None,
    process_count: int | None = None,
    num_examples: int | None = None,
) -> Iterator[dict[str, Any]]:
  """One deterministic pass over `split`, for probes (kNN, linear).

  Each process reads its disjoint part. Every process yields the same number of batches
  (ceil(ceil(N / process_count) / b)), padding its last ones with `valid = False`, so collective
  evaluation steps line up across hosts. Corrupt images also come out with `valid = False` (and
  are counted in `data_skipped`).

  Preprocessing: resize the short side (interpolation `config.data.interpolation`, antialiased)
  to `eval_resize_size(config)` and centre-crop `image_size`, then normalise.

  Args:
    config: the run config.
    split: split name (tfds split or sub-folder of an image folder).
    batch_size: the GLOBAL eval batch; each process yields `batch_size // process_count`.
    process_index: this process (default `jax.process_index()`).
    process_count: the number of processes (default `jax.process_count()`).
    num_examples: use only this many examples of the split (the first ones of a tfds split, which
      tfds stores shuffled; a seeded random subset of an image folder, whose files are sorted by
      class). None: all.

  Yields:
    dict(image=float32 [b, H, W, 3], label=int32 [b], valid=bool [b], pos=int32 [b] (the
    example's position in the split, the same whatever the process count; -1 on padding),
    data_skipped=int).
  """
  process_index, process_count = _process(process_index, process_count)
  local_batch = _local_batch(batch_size, process_count)
  _check_data_config(config)
  if _loader(config) == 'grain':
    source, index = _grain_eval_source(config, split, num_examples)
    return grain_pipeline.eval_batches(
        source, config, index[process_index::process_count], total=len(index),
        resize=eval_resize_size(config), local_batch=local_batch, process_count=process_count)
  ds, total = _eval_source(config, split, num_examples, process_index, process_count)
  size = config.data.image_size
  resize = eval_resize_size(config)
  method = _RESIZE_METHODS[config.data.interpolation]

  def preprocess(ex):
    image = ex['pixels'] if 'pixels' in ex else _decode(_encoded(ex))  # Synthetic: no bytes.
    image = _resize_short_side(image, resize, method)
    image = _central_crop(image, size)
    return _finish(ex, _normalize(image / 255.0, config))

  ds = _decode_batches(ds, preprocess, size, local_batch)
  # Processes with fewer examples add all-padding batches: every process runs `steps` batches.
  steps = _ceil_div(_ceil_div(total, process_count), local_batch)
  padding = tf.data.Dataset.from_tensors(_placeholder(size)).repeat(local_batch).batch(local_batch)
  padding = padding.map(lambda b: dict(b, input_source=b['source'], num_inputs=0)).repeat()
  ds = ds.concatenate(padding).take(steps)
  return _host_batches(ds.prefetch(config.data.prefetch), fill_invalid=False)


def check_dataset(config: ml_collections.ConfigDict, *, process_count: int | None = None) -> None:
  """Fails fast (ValueError naming the fix) if the training data cannot be read as configured.

  Checks the data config and the batch split over processes, and that the training split exists
  (tfds: prepared under data_dir; image folder: has images). Cheap: reads metadata or a listing.
  """
  _local_batch(config.batch_size, jax.process_count() if process_count is None else process_count)
  _check_data_config(config)
  name, split = config.data.dataset, config.data.train_split
  if name == 'image_folder':
    _list_image_folder(config.data.data_dir, split)
  elif name == 'array_record' or (name != 'synthetic' and _loader(config) == 'grain'):
    _grain_source(config, split)
  elif name != 'synthetic':
    _tfds_read(_tfds_builder(config), split, add_tfds_id=False)


def num_examples(config: ml_collections.ConfigDict, split: str) -> int:
  """Number of examples of `split` over all processes (cheap: metadata or a file listing)."""
  name = config.data.dataset
  if name == 'synthetic':
    return _synthetic_size(config, split)
  if name == 'image_folder':
    return len(_list_image_folder(config.data.data_dir, split)[0])
  if name == 'array_record' or _loader(config) == 'grain':
    return len(_grain_source(config, split))
  builder = _tfds_builder(config)
  return int(_tfds_read(builder, split, add_tfds_id=False).cardinality())


def class_names(config: ml_collections.ConfigDict, split: str) -> list[str]:
  """The class names of `split` in label order: label id i is class `class_names(...)[i]`.

  image_folder: the sorted sub-folder names of `data_dir/split`, the order in which the pipeline
  numbers the labels 0..C-1 (empty folders included: they still take a label id). tfds: the names
  of the 'label' ClassLabel feature, one list for every split. synthetic: 'class_0', ...,
  `config.data.num_classes` of them. Cheap: a directory listing or metadata.
  """
  name = config.data.dataset
  if name == 'synthetic':
    return [f'class_{i}' for i in range(int(config.data.num_classes))]
  if name == 'image_folder':
    return list(_image_folder_classes(config.data.data_dir, split))
  if name == 'array_record':
    return grain_pipeline.array_record_class_names(config.data.data_dir)
  features = _tfds_builder(config).info.features
  label = features['label'] if 'label' in features else None
  if not isinstance(label, tfds.features.ClassLabel):
    raise ValueError(f'tfds dataset {name!r} has no ClassLabel feature \'label\' (its features: '
                     f'{sorted(features)}); the probes need a classification dataset.')
  return list(label.names)


def check_label_splits(config: ml_collections.ConfigDict) -> list[str]:
  """Fails fast (one-line ValueError naming the fix) unless probe labels mean the same class.

  A probe fits on `config.data.train_split` and scores on `config.data.eval_split` by label id,
  so both must have the same class names in the same order (else label i is one class in one
  split and another in the other, and the accuracy is silently wrong), at least 2 classes, and
  exactly `config.data.num_classes` of them (the classifier's width). Cheap: listings or
  metadata, no images are read. Returns the class names in label order.
  """
  d = config.data
  train, evals = class_names(config, d.train_split), class_names(config, d.eval_split)
  where_train = _split_location(config, d.train_split)
  where_eval = _split_location(config, d.eval_split)
  for where, names in ((where_train, train), (where_eval, evals)):
    if len(names) < 2:
      shown = ', '.join(repr(n) for n in names) or 'none'
      raise ValueError(f'{where} has {len(names)} class(es) ({shown}), but a classification probe '
                       f'needs at least 2; {_two_classes_fix(config, where)}')
  if train != evals:
    raise ValueError(f'The train and eval splits have different classes, so their label ids would '
                     f'not match: {_class_difference(train, evals, where_train, where_eval)}. '
                     'Give both splits the same classes (for an image folder: the same '
                     '<class name> sub-folders in both).')
  if len(train) != d.num_classes:
    raise ValueError(f'{where_train} has {len(train)} classes but config.data.num_classes='
                     f'{d.num_classes}; set config.data.num_classes={len(train)} (e.g. '
                     f'--config.data.num_classes={len(train)}).')
  return train


def eval_resize_size(config: ml_collections.ConfigDict) -> int:
  """Short side before the evaluation centre crop: round(eval_resize * image_size / 224).

  `config.data.eval_resize` is read as the resize at 224 px, i.e. it fixes the crop fraction
  (224 / 256 = 0.875 by default) for every `image_size`: 256 at 224, 37 at 32, 512 at 448. A
  recipe at another resolution therefore needs no eval key of its own.
  """
  size = config.data.image_size
  resize = int(round(config.data.eval_resize * size / 224))
  if resize < size:
    raise ValueError(
        f'config.data.eval_resize={config.data.eval_resize} gives a short side of {resize} < '
        f'image_size={size}: the centre crop would not fit. Set eval_resize >= 224 (it is the '
        'resize at 224 px; 256 is the usual 0.875 crop fraction).')
  return resize


def to_global_array(batch: dict[str, Any], sharding: jax.sharding.Sharding) -> dict[str, Any]:
  """Host-local batch -> global jax.Arrays, batch dimension split over processes.

  Every numpy array with a batch dimension ([b, ...]) becomes a jax.Array of global shape
  [b * process_count, ...] laid out by `sharding` (e.g. NamedSharding(mesh, P('data'))), built
  with `jax.make_array_from_process_local_data`. Scalars (the per-process `data_skipped` counter)
  pass through unchanged.
  """
  out = {}
  for key, value in batch.items():
    if isinstance(value, np.ndarray) and value.ndim >= 1:
      global_shape = (value.shape[0] * jax.process_count(),) + value.shape[1:]
      out[key] = jax.make_array_from_process_local_data(sharding, value, global_shape)
    else:
      out[key] = value
  return out


# ------------------------------------------------------------------------------------------------
# Checks.
# ------------------------------------------------------------------------------------------------


def _process(process_index: int | None, process_count: int | None) -> tuple[int, int]:
  process_index = jax.process_index() if process_index is None else process_index
  process_count = jax.process_count() if process_count is None else process_count
  if not 0 <= process_index < process_count:
    raise ValueError(
        f'process_index={process_index} must be in [0, process_count={process_count}).')
  return process_index, process_count


def _ceil_div(a: int, b: int) -> int:
  return -(-a // b)


def _local_batch(batch_size: int, process_count: int) -> int:
  if batch_size <= 0 or batch_size % process_count:
    raise ValueError(
        f'The global batch size {batch_size} must be a positive multiple of the number of '
        f'processes ({process_count}); change config.batch_size.')
  return batch_size // process_count


def _loader(config: ml_collections.ConfigDict) -> str:
  """config.data.loader (the default, 'grain', when a config lacks the key)."""
  loader = config.data.get('loader', 'grain')
  if loader not in LOADERS:
    raise ValueError(f"config.data.loader={loader!r} is not one of {LOADERS}; set "
                     "--config.data.loader=grain (no TensorFlow) or tf.")
  return loader


def _grain_source(config: ml_collections.ConfigDict, split: str):
  """The random-access source of `split` for the grain loader (not 'synthetic' training)."""
  name, data_dir = config.data.dataset, config.data.data_dir
  if name == 'synthetic':
    return grain_pipeline.SyntheticSource(config, split, _synthetic_size(config, split))
  if name == 'image_folder':
    return grain_pipeline.ImageFolderSource(*_list_image_folder(data_dir, split))
  if name == 'array_record':
    if not data_dir:
      raise ValueError("config.data.dataset='array_record' needs config.data.data_dir, the "
                       'folder of the <name>-<split>.array_record-* shards.')
    return grain_pipeline.ArrayRecordSource(grain_pipeline.array_record_files(data_dir, split))
  return grain_pipeline.TfdsSource(name, split, data_dir or None)


def _grain_eval_source(config: ml_collections.ConfigDict, split: str, count: int | None):
  """(source, the split positions of the evaluation in order), as the tf.data `_eval_source`:
  the first `count` examples, except an image folder's seeded random subset (sorted by class)."""
  if count is not None and count <= 0:
    raise ValueError(f'num_examples must be positive, got {count}.')
  source = _grain_source(config, split)
  n = len(source)
  index = np.arange(n)
  if count is not None and count < n:
    if config.data.dataset == 'image_folder':
      index = np.sort(np.random.default_rng(0).permutation(n)[:count])
    else:
      index = index[:count]
  return source, index


def _check_data_config(config: ml_collections.ConfigDict) -> None:
  d = config.data
  if _loader(config) == 'tf':
    if d.dataset == 'array_record':
      raise ValueError("config.data.dataset='array_record' is read by the grain loader only; "
                       'set --config.data.loader=grain.')
    tf.__version__  # pylint: disable=pointless-statement  (fails now, in one line, if missing)
  if d.image_size <= 0:
    raise ValueError(f'config.data.image_size must be positive, got {d.image_size}.')
  lo, hi = d.crop_scale
  if not 0 < lo <= hi <= 1:
    raise ValueError(
        f'config.data.crop_scale must satisfy 0 < min <= max <= 1, got {d.crop_scale}.')
  lo, hi = d.crop_ratio
  if not 0 < lo <= hi:
    raise ValueError(f'config.data.crop_ratio must satisfy 0 < min <= max, got {d.crop_ratio}.')
  if d.interpolation not in _RESIZE_METHODS:
    raise ValueError(
        f'config.data.interpolation={d.interpolation!r} is not one of {sorted(_RESIZE_METHODS)}.')
  if len(d.mean) != 3 or len(d.std) != 3 or min(d.std) <= 0:
    raise ValueError(
        f'config.data.mean / std must have 3 entries with std > 0, got {d.mean} / {d.std}.')
  for key in ('color_jitter', 'grayscale', 'blur'):
    if d[key] < 0:
      raise ValueError(f'config.data.{key} must be >= 0, got {d[key]}.')


def _split_location(config: ml_collections.ConfigDict, split: str) -> str:
  """Where `split` is, for messages: its directory, or the tfds / synthetic split's name."""
  name = config.data.dataset
  if name == 'image_folder':
    return os.path.join(config.data.data_dir, split)
  if name == 'synthetic':
    return f'split {split!r} of the synthetic dataset'
  if name == 'array_record':
    return f'split {split!r} of the ArrayRecord dataset in {config.data.data_dir}'
  return f'split {split!r} of tfds dataset {name!r}'


def _two_classes_fix(config: ml_collections.ConfigDict, where: str) -> str:
  name = config.data.dataset
  if name == 'image_folder':
    return f'put the images of each class in their own sub-folder {where}/<class name>/.'
  if name == 'synthetic':
    return 'set config.data.num_classes >= 2.'
  return 'use a classification dataset with at least 2 classes.'


def _class_difference(train: Sequence[str], evals: Sequence[str], where_train: str,
                      where_eval: str) -> str:
  """The first class names that differ between two class lists, as a phrase for a message."""
  only_train = [n for n in train if n not in set(evals)]
  only_eval = [n for n in evals if n not in set(train)]
  if not only_train and not only_eval:  # Same names, another order (the folders are sorted).
    i = next(i for i, (a, b) in enumerate(zip(train, evals)) if a != b)
    return f'label {i} is {train[i]!r} in {where_train} but {evals[i]!r} in {where_eval}'
  parts = []
  for names, here, there in ((only_train, where_train, where_eval),
                             (only_eval, where_eval, where_train)):
    if names:
      more = f' (and {len(names) - 1} more)' if len(names) > 1 else ''
      parts.append(f'{here} has class {names[0]!r}{more} that {there} lacks')
  return '; '.join(parts)


# ------------------------------------------------------------------------------------------------
# Seeds: stateless, derived from (seed, process, stream, ...) so positions alone fix randomness.
# ------------------------------------------------------------------------------------------------


def _seed(base: tf.Tensor, *data) -> tf.Tensor:
  """Folds integers or int64 tensors into a [2] int64 stateless seed."""
  for d in data:
    base = tf.random.experimental.stateless_fold_in(base, tf.cast(d, tf.int64))
  return base


def _base_seed(config: ml_collections.ConfigDict, process_index: int) -> tf.Tensor:
  return tf.constant([config.seed, process_index], tf.int64)


def _split_id(split: str) -> int:
  return zlib.crc32(split.encode())


# ------------------------------------------------------------------------------------------------
# Sources: datasets of dict(pos=int64, label=int64, source=string, encoded=string | path=string |
# pixels=uint8) in training or evaluation order.
# ------------------------------------------------------------------------------------------------


def _train_source(config, start_pos: int, process_index: int,
                  process_count: int) -> tf.data.Dataset:
  """Undecoded examples of one process, in training order, from stream position `start_pos` on."""
  name = config.data.dataset
  base = _base_seed(config, process_index)
  if name == 'synthetic':
    ds = _synthetic_train_source(config, start_pos, process_index, process_count)
  else:
    if name == 'image_folder':
      epoch_fn, n = _image_folder_epochs(config, base, process_index, process_count)
    else:
      epoch_fn, n = _tfds_epochs(config, base, process_index, process_count)
    if n == 0:
      raise ValueError(f'Process {process_index} of {process_count} has no training examples of '
                       f'split {config.data.train_split!r}; use fewer processes or more data.')
    start_epoch, offset = divmod(start_pos, n)
    ds = tf.data.Dataset.range(start_epoch, np.iinfo(np.int64).max).flat_map(epoch_fn)
    ds = ds.skip(offset)  # Before any decoding: on file names or encoded records.
  return ds


def _image_folder_epochs(config, base, process_index, process_count):
  """Per-epoch full permutation of this process's files of an image folder."""
  paths, labels = _list_image_folder(config.data.data_dir, config.data.train_split)
  paths = paths[process_index::process_count]
  labels = labels[process_index::process_count]
  n = len(paths)
  paths_t = tf.constant(paths, tf.string)
  labels_t = tf.constant(labels, tf.int64)

  def epoch(e):
    order = tf.random.experimental.stateless_shuffle(
        tf.range(n, dtype=tf.int64), seed=_seed(base, _ORDER, e))
    pos = e * n + tf.range(n, dtype=tf.int64)
    path = tf.gather(paths_t, order)
    return tf.data.Dataset.from_tensor_slices(
        dict(pos=pos, path=path, source=path, label=tf.gather(labels_t, order)))

  return epoch, n


def _tfds_epochs(config, base, process_index, process_count):
  """Per-epoch random interleave of contiguous chunks of the local tfds split, then a buffer.

  Reading several chunks at once stands in for tfds' file shuffling (whose seed must be a Python
  int and so cannot change per epoch inside one graph); ImageNet's records are additionally
  stored shuffled by tfds.
  """
  builder = _tfds_builder(config)
  split = tfds.split_for_jax_process(
      config.data.train_split, process_index=process_index, process_count=process_count)
  n = int(_tfds_read(builder, split).cardinality())
  k = max(1, min(TFDS_READ_CHUNKS, n))
  chunks = [_tfds_read(builder, s) for s in tfds.even_splits(split, n=k)]
  sizes = [int(c.cardinality()) for c in chunks]
  n = sum(sizes)  # Equals the split size; under tfds.testing.mock_data each chunk is mocked.
  chunk_ids = tf.repeat(tf.range(k, dtype=tf.int64), sizes)
  buffer = max(1, int(config.data.shuffle_buffer))

  def epoch(e):
    choice = tf.random.experimental.stateless_shuffle(chunk_ids, seed=_seed(base, _ORDER, e))
    ds = tf.data.Dataset.choose_from_datasets(chunks, tf.data.Dataset.from_tensor_slices(choice))
    ds = ds.shuffle(buffer, seed=_seed(base, _SHUFFLE, e)[0])
    return ds.enumerate().map(lambda i, ex: _tfds_example(ex, e * n + i))

  return epoch, n


def _tfds_example(ex, pos):
  return dict(pos=pos, encoded=ex['image'], label=ex['label'], source=ex['tfds_id'])


def _synthetic_train_source(config, start_pos, process_index, process_count):
  """Infinite stream; example p of process i is global example p * process_count + i."""
  split_id = _split_id(config.data.train_split)

  def make(pos):
    return _synthetic_example(config, split_id, pos * process_count + process_index, pos)

  return tf.data.Dataset.range(start_pos, np.iinfo(np.int64).max).map(make)


def _synthetic_example(config, split_id: int, example_id, pos):
  """A uint8 noise image [S, S, 3] and a label, a function of (seed, split, example_id)."""
  seed = _seed(tf.constant([config.seed, split_id], tf.int64), _SYNTHETIC, example_id)
  s1, s2 = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
  size = config.data.image_size
  pixels = tf.random.stateless_uniform([size, size, 3], s1, 0, 256, dtype=tf.int32)
  label = tf.random.stateless_uniform([], s2, 0, config.data.num_classes, dtype=tf.int32)
  return dict(pos=pos, pixels=tf.cast(pixels, tf.uint8), label=tf.cast(label, tf.int64),
              source=tf.strings.format('synthetic:{}', example_id))


def _synthetic_size(config, split: str) -> int:
  if split == config.data.train_split:
    return int(config.data.num_train_examples)
  return SYNTHETIC_EVAL_EXAMPLES


def _eval_source(config, split, count, process_index, process_count):
  """(dataset in file order of this process's examples, total number of examples)."""
  name = config.data.dataset
  if count is not None and count <= 0:
    raise ValueError(f'num_examples must be positive, got {count}.')
  if name == 'synthetic':
    total = _synthetic_size(config, split)
    total = total if count is None else min(count, total)
    split_id = _split_id(split)
    ids = tf.data.Dataset.range(process_index, total, process_count)
    return ids.map(lambda i: _synthetic_example(config, split_id, i, i)), total
  if name == 'image_folder':
    paths, labels = _list_image_folder(config.data.data_dir, split)
    index = np.arange(len(paths))
    if count is not None and count < len(paths):
      index = np.sort(np.random.default_rng(0).permutation(len(paths))[:count])
    total = len(index)
    index = index[process_index::process_count]
    path = tf.constant([paths[i] for i in index], tf.string)
    ds = tf.data.Dataset.from_tensor_slices(dict(
        pos=tf.constant(index, tf.int64), path=path, source=path,
        label=tf.constant([labels[i] for i in index], tf.int64)))
    return ds, total
  builder = _tfds_builder(config)
  if count is not None:
    split = f'{split}[:{count}]'
  total = int(_tfds_read(builder, split).cardinality())
  # Process p reads a contiguous range of the split: its examples' global positions start after
  # the earlier processes' ranges (metadata only).
  offset = sum(int(_tfds_read(builder, tfds.split_for_jax_process(
      split, process_index=p, process_count=process_count)).cardinality())
               for p in range(process_index))
  local = tfds.split_for_jax_process(split, process_index=process_index,
                                     process_count=process_count)
  ds = _tfds_read(builder, local).enumerate().map(lambda i, ex: _tfds_example(ex, offset + i))
  return ds, total


_IMAGE_FOLDER_LAYOUT = (
    'An image folder is laid out as DATA_DIR/<split>/<class name>/<image>.jpg (e.g. unpack the '
    'shared CIFAR-10: tar -xzf train.tar.gz -C DATA_DIR && tar -xzf test.tar.gz -C DATA_DIR); set '
    'config.data.data_dir=DATA_DIR.')


@functools.lru_cache(maxsize=16)
def _image_folder_classes(data_dir: str, split: str) -> tuple[str, ...]:
  """Sorted class sub-folder names of `data_dir/split`: class i has label id i."""
  if not data_dir:
    raise ValueError("config.data.dataset='image_folder' needs config.data.data_dir. "
                     f'{_IMAGE_FOLDER_LAYOUT}')
  root = os.path.join(data_dir, split)
  if not _isdir(root):
    raise ValueError(f'Image folder split {root} does not exist. {_IMAGE_FOLDER_LAYOUT}')
  return tuple(sorted(c.rstrip('/') for c in _listdir(root) if _isdir(os.path.join(root, c))))


def _isdir(path: str) -> bool:
  """os.path.isdir; tf.io.gfile for URLs (gs://...), which only the tf.data loader reads."""
  return tf.io.gfile.isdir(path) if '://' in path else os.path.isdir(path)


def _listdir(path: str) -> list[str]:
  return tf.io.gfile.listdir(path) if '://' in path else os.listdir(path)


@functools.lru_cache(maxsize=16)
def _list_image_folder(data_dir: str, split: str) -> tuple[list[str], list[int]]:
  """Sorted (paths, labels) of `data_dir/split/<class>/<image>`; classes sorted -> 0..C-1."""
  root = os.path.join(data_dir, split)
  paths, labels = [], []
  for label, cls in enumerate(_image_folder_classes(data_dir, split)):
    files = sorted(f for f in _listdir(os.path.join(root, cls))
                   if f.lower().endswith(IMAGE_EXTENSIONS))
    paths.extend(os.path.join(root, cls, f) for f in files)
    labels.extend([label] * len(files))
  if not paths:
    raise ValueError(f'No images ({", ".join(IMAGE_EXTENSIONS)}) under {root}/<class>/. '
                     f'{_IMAGE_FOLDER_LAYOUT}')
  return paths, labels


def _tfds_builder(config):
  name = config.data.dataset
  data_dir = config.data.data_dir or None
  try:
    return tfds.builder(name, data_dir=data_dir)
  except tfds.core.registered.DatasetNotFoundError as e:
    raise ValueError(
        f"Unknown dataset {name!r}: config.data.dataset must be a tfds name (e.g. "
        "'imagenet2012', 'imagenet2012_subset/1pct', 'cifar10'), 'image_folder' or "
        "'synthetic'.") from e


def _tfds_read(builder, split, *, add_tfds_id: bool = True) -> tf.data.Dataset:
  """The split's records in stored order, images left encoded; clear errors if not prepared."""
  features = builder.info.features
  if 'image' not in features or 'label' not in features:
    raise ValueError(f'tfds dataset {builder.name!r} has features {sorted(features)}; the input '
                     "pipeline needs an 'image' and a 'label' feature.")
  try:
    return builder.as_dataset(
        split=split, shuffle_files=False,
        decoders={'image': tfds.decode.SkipDecoding()},
        read_config=tfds.ReadConfig(add_tfds_id=add_tfds_id, try_autocache=False))
  except AssertionError as e:  # tfds' "could not find data in <data_dir>".
    raise ValueError(
        f'tfds dataset {builder.name!r} is not prepared under {builder.data_dir}. Downloads are '
        'never attempted. For ImageNet put ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar in '
        '<data_dir>/downloads/manual/ and run `tfds build imagenet2012 --data_dir=<data_dir>` '
        '(likewise `tfds build <name> --data_dir=<data_dir>` for others), or point '
        'config.data.data_dir at an existing tfds data_dir (local or gs://).') from e
  except (KeyError, ValueError) as e:
    raise ValueError(f'Cannot read split {split!r} of tfds dataset {builder.name!r} '
                     f'(known splits: {sorted(builder.info.splits.keys())}): {e}') from e


# ------------------------------------------------------------------------------------------------
# Decoding with a placeholder on failure.
# ------------------------------------------------------------------------------------------------


def _decode_batches(ds: tf.data.Dataset, preprocess, size: int, batch: int) -> tf.data.Dataset:
  """Batches `ds` by `batch` elements, then decodes each batch; failures become placeholders.

  Grouping comes first, on the encoded records, so batch k always holds the examples of stream
  positions [k * batch, (k + 1) * batch): the examples whose `preprocess` raises (corrupt or
  unreadable images) are dropped by `ignore_errors()` inside their batch only, and the batch is
  topped up with placeholders (zero image, `valid = False`, `pos = -1`). A plain
  `ignore_errors()` on the stream would shift every later batch and break exact resumption;
  doing it per element (a one-element dataset each) keeps alignment but costs ~2x the CPU.
  A short last input batch (evaluation) is padded the same way.

  Returns batches dict(image [b, S, S, 3], valid [b], pos [b], label [b], source [b],
  input_source [b]: the sources of the inputs, num_inputs: int32 number of real inputs).
  """

  def one(exs):
    num_inputs = tf.shape(exs['pos'])[0]
    input_source = tf.concat([exs['source'], tf.fill([batch - num_inputs], '')], 0)
    good = tf.data.Dataset.from_tensor_slices(exs).map(
        preprocess, num_parallel_calls=_decode_threads(), deterministic=True).ignore_errors()
    pad = tf.data.Dataset.from_tensors(_placeholder(size)).repeat()
    out = good.concatenate(pad).take(batch).batch(batch)
    return out.map(lambda b: dict(b, input_source=input_source, num_inputs=num_inputs))

  # Two batches in flight, so the cores stay busy across batch boundaries; order is kept.
  # (Measured: as fast as a plain parallel map + ignore_errors; AUTOTUNE inside the nested
  # datasets tuned poorly, hence the fixed thread count.)
  return ds.batch(batch).interleave(one, cycle_length=2, block_length=1, num_parallel_calls=2,
                                    deterministic=True)


def _decode_threads() -> int:
  """Decoding parallelism per batch: twice the cores this process may use."""
  cores = len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else os.cpu_count()
  return 2 * (cores or 1)


def _placeholder(size: int):
  """Zero image with valid = False, pos = -1, label = -1."""
  return dict(image=tf.zeros([size, size, 3], tf.float32), valid=tf.constant(False),
              pos=tf.constant(-1, tf.int64), label=tf.constant(-1, tf.int32),
              source=tf.constant('', tf.string))


def _finish(ex, image):
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


def _train_preprocess(ex, *, config, aug_base):
  """Example -> dict(image=float32 [S, S, 3] normalised, ...), randomness seeded by position."""
  d = config.data
  seeds = tf.unstack(tf.random.experimental.stateless_split(_seed(aug_base, ex['pos']), 5))
  crop_fn = functools.partial(random_resized_crop_window, scale=d.crop_scale, ratio=d.crop_ratio,
                              seed=seeds[0])
  if 'pixels' in ex:  # Synthetic: already an image.
    image = _crop(ex['pixels'], crop_fn)
  else:
    image = _decode_and_crop(_encoded(ex), crop_fn)
  image = tf.image.resize(image, [d.image_size, d.image_size], _RESIZE_METHODS[d.interpolation],
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
  return _finish(ex, _normalize(image, config))


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


def _normalize(image, config):
  """[0, 1] pixels -> (x - mean) / std per channel."""
  mean = tf.constant(config.data.mean, tf.float32)
  std = tf.constant(config.data.std, tf.float32)
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


# ------------------------------------------------------------------------------------------------
# Host side.
# ------------------------------------------------------------------------------------------------


def _host_batches(ds: tf.data.Dataset, *, fill_invalid: bool) -> Iterator[dict[str, Any]]:
  """numpy batches; counts, logs and (training) replaces the images that failed to decode."""
  skipped = 0
  for batch in ds.as_numpy_iterator():
    valid = batch['valid']
    failed = int(batch['num_inputs']) - int(valid.sum())
    if failed:
      skipped += failed
      names = set(batch['input_source'][:batch['num_inputs']]) - set(batch['source'][valid])
      logging.warning('Input pipeline: skipped %d undecodable image(s) (%d so far): %s', failed,
                      skipped, ', '.join(sorted(n.decode(errors='replace') for n in names)[:5]))
    if fill_invalid:
      out = dict(image=_fill_invalid(batch['image'], valid),
                 label=_fill_invalid(batch['label'], valid))
    else:   # Evaluation: `pos`, the example's position in the split, orders gathered rows.
      out = dict(image=batch['image'], label=batch['label'], valid=valid,
                 pos=batch['pos'].astype(np.int32))
    out['data_skipped'] = skipped
    yield out


def _fill_invalid(x: np.ndarray, valid: np.ndarray) -> np.ndarray:
  """Slots with valid = False take, in turn, the values of the valid slots (static batch size)."""
  if valid.all() or not valid.any():
    return x
  good = np.flatnonzero(valid)
  bad = np.flatnonzero(~valid)
  x = x.copy()
  x[bad] = x[good[np.arange(bad.size) % good.size]]
  return x
