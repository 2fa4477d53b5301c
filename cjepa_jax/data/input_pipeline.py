"""The input API: training and evaluation batches, dataset checks and class names.

The trainers, the probes and fine-tuning call only this module, with the run's `DataSpec`
(`spec.py`: `config.data.*` read once where the config enters). Two loaders (`data.loader`) sit
behind the same functions:
  * 'grain' (the default): `grain_loader` over `sources` (image folder, ArrayRecord, tfds
    prepared as ArrayRecord, synthetic) with `augment` (numpy / PIL); no TensorFlow. A global
    shuffle; a step's examples are a function of (seed, step) alone.
  * 'tf': `tf_loader` with `tf_augment` (tf.data over tfds, an image folder or synthetic images);
    TensorFlow is imported on first use (`lazy_tf`) and needs `pip install -e '.[tf]'`.
Both hand host-local numpy batches to the caller, which places them on the devices with
`to_global_array`, and both resume exactly from a step number alone (no iterator state in the
checkpoint).

`class_names(data, split)` gives the class of each label id; `check_label_splits(data)` (the
probes and fine-tuning call it) refuses train / eval splits whose classes differ, so label ids
never silently mean different classes. Evaluation input (`make_eval_iterator`): resize the short
side, centre-crop `image_size`, normalise, one pass in file order, the last batch padded with
`valid = False`, and the same number of batches on every process.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator, Sequence
from typing import Any

from absl import logging
import jax
import numpy as np

from cjepa_jax.data import array_record
from cjepa_jax.data import augment
from cjepa_jax.data import batching
from cjepa_jax.data import grain_loader
from cjepa_jax.data import image_folder
from cjepa_jax.data import lazy_tf
from cjepa_jax.data import sources
from cjepa_jax.data import tf_loader
from cjepa_jax.data.spec import DataSpec


LOADERS = ('tf', 'grain')


# ------------------------------------------------------------------------------------------------
# Public API.
# ------------------------------------------------------------------------------------------------


def make_train_iterator(
    data: DataSpec,
    *,
    start_step: int = 0,
    process_index: int | None = None,
    process_count: int | None = None,
) -> Iterator[dict[str, Any]]:
  """Infinite iterator of host-local training batches, starting at step `start_step`.

  Args:
    data: the run's data (`batch_size` = the global batch, `seed`).
    start_step: the first step to produce; batch k of the iterator is the batch of step
      `start_step + k`, identical to an uninterrupted run's.
    process_index: this process (default `jax.process_index()`).
    process_count: the number of processes (default `jax.process_count()`).

  Yields:
    dict(image=float32 [b, H, W, 3] normalised, label=int32 [b],
         data_skipped=int: corrupt/unreadable images replaced so far by this iterator),
    with b = batch_size // process_count and H = W = data.image_size.
  """
  process_index, process_count = _process(process_index, process_count)
  local_batch = batching.local_batch(data.batch_size, process_count)
  _check_data_config(data)
  if _loader(data) == 'grain':
    it = _grain_train_batches(data, start_step, local_batch, process_index, process_count)
  else:
    it = tf_loader.train_iterator(data, start_step=start_step, local_batch=local_batch,
                                  process_index=process_index, process_count=process_count)
  # Once per run (the trainers build one training iterator): whether anything imported TensorFlow.
  logging.info('Input pipeline: loader=%s, tensorflow_imported=%s', _loader(data),
               isinstance(sys.modules.get('tensorflow'), type(sys)))
  return it


def _grain_train_batches(data: DataSpec, start_step: int, local_batch: int, process_index: int,
                         process_count: int) -> Iterator[dict[str, Any]]:
  if data.dataset == 'synthetic':  # An endless stream: global position = example id.
    source = sources.SyntheticSource(data, data.train_split, sources.SYNTHETIC_STREAM)
  else:
    source = sources.grain_source(data, data.train_split)
    if not len(source):  # pylint: disable=g-explicit-length-test
      raise ValueError(f'Split {data.train_split!r} of {data.dataset!r} has no '
                       'examples; use a split with data.')
  return grain_loader.train_batches(
      source, data, start_step=start_step, local_batch=local_batch,
      process_index=process_index, process_count=process_count,
      infinite_source=data.dataset == 'synthetic')


def make_eval_iterator(
    data: DataSpec,
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

  Preprocessing: resize the short side (interpolation `data.interpolation`, antialiased)
  to `eval_resize_size(data)` and centre-crop `image_size`, then normalise.

  Args:
    data: the run's data.
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
  local_batch = batching.local_batch(batch_size, process_count)
  _check_data_config(data)
  if _loader(data) == 'grain':
    source, index = _grain_eval_source(data, split, num_examples)
    return grain_loader.eval_batches(
        source, data, index[process_index::process_count], total=len(index),
        resize=eval_resize_size(data), local_batch=local_batch, process_count=process_count)
  return tf_loader.eval_iterator(data, split, num_examples=num_examples,
                                 resize=eval_resize_size(data), local_batch=local_batch,
                                 process_index=process_index, process_count=process_count)


def check_dataset(data: DataSpec, *, process_count: int | None = None) -> None:
  """Fails fast (ValueError naming the fix) if the training data cannot be read as configured.

  Checks the data config and the batch split over processes, and that the training split exists
  (tfds: prepared under data_dir; image folder: has images). Cheap: reads metadata or a listing.
  """
  batching.local_batch(data.batch_size,
                       jax.process_count() if process_count is None else process_count)
  _check_data_config(data)
  name, split = data.dataset, data.train_split
  if name == 'image_folder':
    image_folder.list_images(data.data_dir, split)
  elif name == 'array_record' or (name != 'synthetic' and _loader(data) == 'grain'):
    sources.grain_source(data, split)
  elif name != 'synthetic':
    tf_loader.tfds_read(tf_loader.tfds_builder(data), split, add_tfds_id=False)


def num_examples(data: DataSpec, split: str) -> int:
  """Number of examples of `split` over all processes (cheap: metadata or a file listing)."""
  name = data.dataset
  if name == 'synthetic':
    return sources.synthetic_size(data, split)
  if name == 'image_folder':
    return len(image_folder.list_images(data.data_dir, split)[0])
  if name == 'array_record' or _loader(data) == 'grain':
    return len(sources.grain_source(data, split))
  builder = tf_loader.tfds_builder(data)
  return int(tf_loader.tfds_read(builder, split, add_tfds_id=False).cardinality())


def class_names(data: DataSpec, split: str) -> list[str]:
  """The class names of `split` in label order: label id i is class `class_names(...)[i]`.

  image_folder: the sorted sub-folder names of `data_dir/split`, the order in which the pipeline
  numbers the labels 0..C-1 (empty folders included: they still take a label id). tfds: the names
  of the 'label' ClassLabel feature, one list for every split. synthetic: 'class_0', ...,
  `data.num_classes` of them. Cheap: a directory listing or metadata.
  """
  name = data.dataset
  if name == 'synthetic':
    return [f'class_{i}' for i in range(int(data.num_classes))]
  if name == 'image_folder':
    return list(image_folder.list_classes(data.data_dir, split))
  if name == 'array_record':
    return array_record.class_names(data.data_dir)
  features = tf_loader.tfds_builder(data).info.features
  label = features['label'] if 'label' in features else None
  if not isinstance(label, lazy_tf.tfds.features.ClassLabel):
    raise ValueError(f'tfds dataset {name!r} has no ClassLabel feature \'label\' (its features: '
                     f'{sorted(features)}); the probes need a classification dataset.')
  return list(label.names)


def check_label_splits(data: DataSpec) -> list[str]:
  """Fails fast (one-line ValueError naming the fix) unless probe labels mean the same class.

  A probe fits on `data.train_split` and scores on `data.eval_split` by label id, so both must
  have the same class names in the same order (else label i is one class in one split and
  another in the other, and the accuracy is silently wrong), at least 2 classes, and exactly
  `data.num_classes` of them (the classifier's width). Cheap: listings or metadata, no images
  are read. Returns the class names in label order.
  """
  d = data
  train, evals = class_names(data, d.train_split), class_names(data, d.eval_split)
  where_train = _split_location(data, d.train_split)
  where_eval = _split_location(data, d.eval_split)
  for where, names in ((where_train, train), (where_eval, evals)):
    if len(names) < 2:
      shown = ', '.join(repr(n) for n in names) or 'none'
      raise ValueError(f'{where} has {len(names)} class(es) ({shown}), but a classification probe '
                       f'needs at least 2; {_two_classes_fix(data, where)}')
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


def eval_resize_size(data: DataSpec) -> int:
  """Short side before the evaluation centre crop: round(eval_resize * image_size / 224).

  `data.eval_resize` is read as the resize at 224 px, i.e. it fixes the crop fraction
  (224 / 256 = 0.875 by default) for every `image_size`: 256 at 224, 37 at 32, 512 at 448. A
  recipe at another resolution therefore needs no eval key of its own.
  """
  size = data.image_size
  resize = int(round(data.eval_resize * size / 224))
  if resize < size:
    raise ValueError(
        f'config.data.eval_resize={data.eval_resize} gives a short side of {resize} < '
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


def _loader(data: DataSpec) -> str:
  """config.data.loader, checked."""
  loader = data.loader
  if loader not in LOADERS:
    raise ValueError(f"config.data.loader={loader!r} is not one of {LOADERS}; set "
                     "--config.data.loader=grain (no TensorFlow) or tf.")
  return loader


def _grain_eval_source(data: DataSpec, split: str, count: int | None
                       ) -> tuple[Any, np.ndarray]:
  """(source, the split positions of the evaluation in order), as the tf.data `_eval_source`:
  the first `count` examples, except an image folder's seeded random subset (sorted by class)."""
  if count is not None and count <= 0:
    raise ValueError(f'num_examples must be positive, got {count}.')
  source = sources.grain_source(data, split)
  n = len(source)
  index = np.arange(n)
  if count is not None and count < n:
    if data.dataset == 'image_folder':
      index = np.sort(np.random.default_rng(0).permutation(n)[:count])
    else:
      index = index[:count]
  return source, index


def _check_data_config(data: DataSpec) -> None:
  d = data
  if _loader(data) == 'tf':
    if d.dataset == 'array_record':
      raise ValueError("config.data.dataset='array_record' is read by the grain loader only; "
                       'set --config.data.loader=grain.')
    # Fails now, in one line, if TensorFlow is missing.
    lazy_tf.tf.__version__  # pylint: disable=pointless-statement
  if d.image_size <= 0:
    raise ValueError(f'config.data.image_size must be positive, got {d.image_size}.')
  lo, hi = d.crop_scale
  if not 0 < lo <= hi <= 1:
    raise ValueError(
        f'config.data.crop_scale must satisfy 0 < min <= max <= 1, got {d.crop_scale}.')
  lo, hi = d.crop_ratio
  if not 0 < lo <= hi:
    raise ValueError(f'config.data.crop_ratio must satisfy 0 < min <= max, got {d.crop_ratio}.')
  if d.interpolation not in augment.RESAMPLE:
    raise ValueError(
        f'config.data.interpolation={d.interpolation!r} is not one of {sorted(augment.RESAMPLE)}.')
  if len(d.mean) != 3 or len(d.std) != 3 or min(d.std) <= 0:
    raise ValueError(
        f'config.data.mean / std must have 3 entries with std > 0, got {d.mean} / {d.std}.')
  for key in ('color_jitter', 'grayscale', 'blur'):
    if getattr(d, key) < 0:
      raise ValueError(f'config.data.{key} must be >= 0, got {getattr(d, key)}.')


def _split_location(data: DataSpec, split: str) -> str:
  """Where `split` is, for messages: its directory, or the tfds / synthetic split's name."""
  name = data.dataset
  if name == 'image_folder':
    return os.path.join(data.data_dir, split)
  if name == 'synthetic':
    return f'split {split!r} of the synthetic dataset'
  if name == 'array_record':
    return f'split {split!r} of the ArrayRecord dataset in {data.data_dir}'
  return f'split {split!r} of tfds dataset {name!r}'


def _two_classes_fix(data: DataSpec, where: str) -> str:
  name = data.dataset
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
