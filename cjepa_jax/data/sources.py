"""The grain loader's sources: random access (`len`, `[i]`) to the examples of one split.

Each [i] is dict(encoded=bytes | pixels=uint8 [h, w, 3], label=int, source=str: a name for
messages), decoding left to the augmentation:
  * 'image_folder': `ImageFolderSource`, the files of `image_folder.list_images`.
  * 'array_record': `ArrayRecordSource`, the shards of `array_record.shard_files`.
  * any tfds name: `TfdsSource`, `tfds.data_source(name, split, data_dir=...)` (prepared as
    ArrayRecord; needs tensorflow-datasets, not TensorFlow).
  * 'synthetic': `SyntheticSource`, numpy noise images, a function of (seed, split, example id).
`grain_source(data, split)` picks one from the run's `DataSpec`.
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence
from typing import Any

import numpy as np

from cjepa_jax.data import array_record
from cjepa_jax.data import image_folder
from cjepa_jax.data import lazy_tf
from cjepa_jax.data.spec import DataSpec


# Size of every split of the 'synthetic' dataset except the training split, whose size is
# `data.num_train_examples`.
SYNTHETIC_EVAL_EXAMPLES = 10_000


# Stream id folded into the synthetic images' seeds (the tf.data loader's is the same number).
_SYNTHETIC = 4
# The synthetic training stream: global position = example id, endless in practice.
SYNTHETIC_STREAM = 2 ** 62


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
    features = array_record.parse_example(self._source[i])
    return dict(encoded=features['image'][0], label=int(features['label'][0]),
                source=f'array_record:{i}')


class TfdsSource:
  """`tfds.data_source` (a tfds dataset prepared as ArrayRecord), images left encoded."""

  def __init__(self, name: str, split: str, data_dir: str | None):
    try:
      import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top  (an extra)
    except ImportError as e:
      raise lazy_tf.MissingDependencyError(lazy_tf.MISSING_TFDS) from e
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

  def __init__(self, data: DataSpec, split: str, size: int):
    self._seed, self._split = int(data.seed), zlib.crc32(split.encode())
    self._image_size, self._classes, self._size = (int(data.image_size),
                                                   int(data.num_classes), size)

  def __len__(self) -> int:
    return self._size

  def __getitem__(self, i: int) -> dict[str, Any]:
    rng = np.random.default_rng([self._seed, self._split, _SYNTHETIC, int(i)])
    s = self._image_size
    return dict(pixels=rng.integers(0, 256, (s, s, 3), dtype=np.uint8),
                label=int(rng.integers(0, self._classes)), source=f'synthetic:{i}')


def synthetic_size(data: DataSpec, split: str) -> int:
  """Examples in `split` of the synthetic dataset: `data.num_train_examples` for the training
  split (it defines an epoch), `SYNTHETIC_EVAL_EXAMPLES` for any other."""
  if split == data.train_split:
    return int(data.num_train_examples)
  return SYNTHETIC_EVAL_EXAMPLES


def grain_source(data: DataSpec, split: str
                 ) -> ImageFolderSource | ArrayRecordSource | TfdsSource | SyntheticSource:
  """The random-access source of `split` (for 'synthetic' training: `SyntheticSource` of
  `SYNTHETIC_STREAM` examples)."""
  name, data_dir = data.dataset, data.data_dir
  if name == 'synthetic':
    return SyntheticSource(data, split, synthetic_size(data, split))
  if name == 'image_folder':
    return ImageFolderSource(*image_folder.list_images(data_dir, split))
  if name == 'array_record':
    if not data_dir:
      raise ValueError("config.data.dataset='array_record' needs config.data.data_dir, the "
                       'folder of the <name>-<split>.array_record-* shards.')
    return ArrayRecordSource(array_record.shard_files(data_dir, split))
  return TfdsSource(name, split, data_dir or None)
