"""The tf.data loader (`data.loader = 'tf'`): tfds, an image folder or synthetic images.

The package's only TensorFlow user with `tf_augment`; TensorFlow is imported on first use
(`lazy_tf`), needs `pip install -e '.[tf]'`, and the grain loader never imports it.

Sources (`data.dataset`):
  * any tfds name ('imagenet2012', 'imagenet2012_subset/1pct', 'cifar10', ...), read from
    `data.data_dir` with `tfds.builder(name, data_dir=...)`; never downloads.
  * 'image_folder': `data_dir/<split>/<label>/<image>` (`image_folder`'s listing).
  * 'synthetic': random images and labels made in TensorFlow from the seed; no files.

Training (`train_iterator`): each process reads its own disjoint part of the split (tfds:
`tfds.split_for_jax_process`; image folder: files `process_index::process_count` of the sorted
list), in an order fixed per epoch by (seed, epoch, process), decodes, augments (`tf_augment`),
batches `batch_size // process_count` and prefetches.

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

Evaluation (`eval_iterator`): one pass in file order, the last batch padded with `valid = False`,
and the same number of batches on every process.
"""

from __future__ import annotations

import functools
import os
import zlib
from collections.abc import Iterator
from typing import Any

from absl import logging
import numpy as np

from cjepa_jax.data import batching
from cjepa_jax.data import image_folder
from cjepa_jax.data import sources
from cjepa_jax.data import tf_augment
from cjepa_jax.data.lazy_tf import tf
from cjepa_jax.data.lazy_tf import tfds
from cjepa_jax.data.spec import DataSpec


# tfds training reads the local split as this many contiguous chunks, interleaved at random per
# epoch (a per-epoch "file shuffle" whose state is a function of the epoch number alone).
TFDS_READ_CHUNKS = 32


def train_iterator(data: DataSpec, *, start_step: int, local_batch: int,
                   process_index: int, process_count: int) -> Iterator[dict[str, Any]]:
  """Host-local training batches from step `start_step` on (see the module docstring).

  Yields dict(image=float32 [b, S, S, 3], label=int32 [b], data_skipped=int).
  """
  ds = _train_source(data, start_step * local_batch, process_index, process_count)
  preprocess = functools.partial(
      tf_augment.train_preprocess, data=data,
      aug_base=tf_augment.seed(tf_augment.base_seed(data, process_index), tf_augment.AUGMENT))
  ds = _decode_batches(ds, preprocess, data.image_size, local_batch)
  return _host_batches(ds.prefetch(data.prefetch), fill_invalid=True)


def eval_iterator(data: DataSpec, split: str, *, num_examples: int | None,
                  resize: int, local_batch: int, process_index: int, process_count: int
                  ) -> Iterator[dict[str, Any]]:
  """One pass over `split` in file order, padded to the common batch count of every process.

  Yields dict(image [b, S, S, 3], label [b], valid [b], pos int32 [b] (-1 on padding),
  data_skipped).
  """
  ds, total = _eval_source(data, split, num_examples, process_index, process_count)
  size = data.image_size
  preprocess = functools.partial(tf_augment.eval_preprocess, data=data, resize=resize)
  ds = _decode_batches(ds, preprocess, size, local_batch)
  # Processes with fewer examples add all-padding batches: every process runs `steps` batches.
  steps = batching.eval_steps(total, process_count, local_batch)
  padding = tf.data.Dataset.from_tensors(tf_augment.placeholder(size)).repeat(local_batch)
  padding = padding.batch(local_batch).map(
      lambda b: dict(b, input_source=b['source'], num_inputs=0)).repeat()
  ds = ds.concatenate(padding).take(steps)
  return _host_batches(ds.prefetch(data.prefetch), fill_invalid=False)


def _split_id(split: str) -> int:
  return zlib.crc32(split.encode())


# ------------------------------------------------------------------------------------------------
# Sources: datasets of dict(pos=int64, label=int64, source=string, encoded=string | path=string |
# pixels=uint8) in training or evaluation order.
# ------------------------------------------------------------------------------------------------


def _train_source(data: DataSpec, start_pos: int, process_index: int,
                  process_count: int) -> tf.data.Dataset:
  """Undecoded examples of one process, in training order, from stream position `start_pos` on."""
  name = data.dataset
  base = tf_augment.base_seed(data, process_index)
  if name == 'synthetic':
    ds = _synthetic_train_source(data, start_pos, process_index, process_count)
  else:
    if name == 'image_folder':
      epoch_fn, n = _image_folder_epochs(data, base, process_index, process_count)
    else:
      epoch_fn, n = _tfds_epochs(data, base, process_index, process_count)
    if n == 0:
      raise ValueError(f'Process {process_index} of {process_count} has no training examples of '
                       f'split {data.train_split!r}; use fewer processes or more data.')
    start_epoch, offset = divmod(start_pos, n)
    ds = tf.data.Dataset.range(start_epoch, np.iinfo(np.int64).max).flat_map(epoch_fn)
    ds = ds.skip(offset)  # Before any decoding: on file names or encoded records.
  return ds


def _image_folder_epochs(data: DataSpec, base, process_index, process_count):
  """Per-epoch full permutation of this process's files of an image folder."""
  paths, labels = image_folder.list_images(data.data_dir, data.train_split)
  paths = paths[process_index::process_count]
  labels = labels[process_index::process_count]
  n = len(paths)
  paths_t = tf.constant(paths, tf.string)
  labels_t = tf.constant(labels, tf.int64)

  def epoch(e):
    order = tf.random.experimental.stateless_shuffle(
        tf.range(n, dtype=tf.int64), seed=tf_augment.seed(base, tf_augment.ORDER, e))
    pos = e * n + tf.range(n, dtype=tf.int64)
    path = tf.gather(paths_t, order)
    return tf.data.Dataset.from_tensor_slices(
        dict(pos=pos, path=path, source=path, label=tf.gather(labels_t, order)))

  return epoch, n


def _tfds_epochs(data: DataSpec, base, process_index, process_count):
  """Per-epoch random interleave of contiguous chunks of the local tfds split, then a buffer.

  Reading several chunks at once stands in for tfds' file shuffling (whose seed must be a Python
  int and so cannot change per epoch inside one graph); ImageNet's records are additionally
  stored shuffled by tfds.
  """
  builder = tfds_builder(data)
  split = tfds.split_for_jax_process(
      data.train_split, process_index=process_index, process_count=process_count)
  n = int(tfds_read(builder, split).cardinality())
  k = max(1, min(TFDS_READ_CHUNKS, n))
  chunks = [tfds_read(builder, s) for s in tfds.even_splits(split, n=k)]
  sizes = [int(c.cardinality()) for c in chunks]
  n = sum(sizes)  # Equals the split size; under tfds.testing.mock_data each chunk is mocked.
  chunk_ids = tf.repeat(tf.range(k, dtype=tf.int64), sizes)
  buffer = max(1, int(data.shuffle_buffer))

  def epoch(e):
    choice = tf.random.experimental.stateless_shuffle(
        chunk_ids, seed=tf_augment.seed(base, tf_augment.ORDER, e))
    ds = tf.data.Dataset.choose_from_datasets(chunks, tf.data.Dataset.from_tensor_slices(choice))
    ds = ds.shuffle(buffer, seed=tf_augment.seed(base, tf_augment.SHUFFLE, e)[0])
    return ds.enumerate().map(lambda i, ex: _tfds_example(ex, e * n + i))

  return epoch, n


def _tfds_example(ex, pos):
  return dict(pos=pos, encoded=ex['image'], label=ex['label'], source=ex['tfds_id'])


def _synthetic_train_source(data: DataSpec, start_pos, process_index, process_count):
  """Infinite stream; example p of process i is global example p * process_count + i."""
  split_id = _split_id(data.train_split)

  def make(pos):
    return _synthetic_example(data, split_id, pos * process_count + process_index, pos)

  return tf.data.Dataset.range(start_pos, np.iinfo(np.int64).max).map(make)


def _synthetic_example(data: DataSpec, split_id: int, example_id, pos):
  """A uint8 noise image [S, S, 3] and a label, a function of (seed, split, example_id)."""
  seed = tf_augment.seed(tf.constant([data.seed, split_id], tf.int64), tf_augment.SYNTHETIC,
                         example_id)
  s1, s2 = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
  size = data.image_size
  pixels = tf.random.stateless_uniform([size, size, 3], s1, 0, 256, dtype=tf.int32)
  label = tf.random.stateless_uniform([], s2, 0, data.num_classes, dtype=tf.int32)
  return dict(pos=pos, pixels=tf.cast(pixels, tf.uint8), label=tf.cast(label, tf.int64),
              source=tf.strings.format('synthetic:{}', example_id))


def _eval_source(data: DataSpec, split, count, process_index, process_count):
  """(dataset in file order of this process's examples, total number of examples)."""
  name = data.dataset
  if count is not None and count <= 0:
    raise ValueError(f'num_examples must be positive, got {count}.')
  if name == 'synthetic':
    total = sources.synthetic_size(data, split)
    total = total if count is None else min(count, total)
    split_id = _split_id(split)
    ids = tf.data.Dataset.range(process_index, total, process_count)
    return ids.map(lambda i: _synthetic_example(data, split_id, i, i)), total
  if name == 'image_folder':
    paths, labels = image_folder.list_images(data.data_dir, split)
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
  builder = tfds_builder(data)
  if count is not None:
    split = f'{split}[:{count}]'
  total = int(tfds_read(builder, split).cardinality())
  # Process p reads a contiguous range of the split: its examples' global positions start after
  # the earlier processes' ranges (metadata only).
  offset = sum(int(tfds_read(builder, tfds.split_for_jax_process(
      split, process_index=p, process_count=process_count)).cardinality())
               for p in range(process_index))
  local = tfds.split_for_jax_process(split, process_index=process_index,
                                     process_count=process_count)
  ds = tfds_read(builder, local).enumerate().map(lambda i, ex: _tfds_example(ex, offset + i))
  return ds, total


def tfds_builder(data: DataSpec):
  name = data.dataset
  data_dir = data.data_dir or None
  try:
    return tfds.builder(name, data_dir=data_dir)
  except tfds.core.registered.DatasetNotFoundError as e:
    raise ValueError(
        f"Unknown dataset {name!r}: config.data.dataset must be a tfds name (e.g. "
        "'imagenet2012', 'imagenet2012_subset/1pct', 'cifar10'), 'image_folder' or "
        "'synthetic'.") from e


def tfds_read(builder, split, *, add_tfds_id: bool = True) -> tf.data.Dataset:
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
    pad = tf.data.Dataset.from_tensors(tf_augment.placeholder(size)).repeat()
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
      out = dict(image=batching.fill_invalid(batch['image'], valid),
                 label=batching.fill_invalid(batch['label'], valid))
    else:   # Evaluation: `pos`, the example's position in the split, orders gathered rows.
      out = dict(image=batch['image'], label=batch['label'], valid=valid,
                 pos=batch['pos'].astype(np.int32))
    out['data_skipped'] = skipped
    yield out
