r"""Image folder -> ArrayRecord shards that the grain loader reads (`dataset='array_record'`).

  python -m cjepa_jax.array_record --src=/data/imagenet21k --dst=/data/in21k_ar \
      --splits=train,val --name=in21k --shard_size=10000

reads `src/<split>/<class>/<image>` (classes sorted -> label ids 0..C-1, as the image-folder
loader numbers them) and writes, for each split,

  dst/<name>-<split>.array_record-00000-of-000NN   serialized tf.train.Example records:
                                                   'image' (the file's bytes, not re-encoded),
                                                   'label' (int64)
  dst/label.labels.txt                             the class names, one a line, in label order

the layout and record format of a tfds dataset prepared with `--file_format=array_record`. The
records are written in a seeded random order, so a shard or a prefix of the split is a random
sample (the loader still shuffles globally). Then train with

  --config.data.loader=grain --config.data.dataset=array_record --config.data.data_dir=dst

No TensorFlow is needed to write or to read.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

from absl import app
from absl import flags
import numpy as np

from cjepa_jax import grain_pipeline


def convert_image_folder(src: str, dst: str, splits: Sequence[str], *, name: str = 'data',
                         shard_size: int = 10_000, seed: int = 0) -> dict[str, int]:
  """Writes the ArrayRecord shards of `splits` of the image folder `src` to `dst`.

  Every split must have the same class sub-folders (their label ids must mean the same class).

  Returns:
    dict(split -> number of records written).
  """
  # pylint: disable=g-import-not-at-top  (the input pipeline's listing; no TensorFlow)
  from array_record.python import array_record_module
  from cjepa_jax import input_pipeline
  # pylint: enable=g-import-not-at-top
  if shard_size <= 0:
    raise ValueError(f'shard_size must be positive, got {shard_size}.')
  classes = None
  counts = {}
  os.makedirs(dst, exist_ok=True)
  for split in splits:
    # pylint: disable-next=protected-access  (the image-folder loader's own listing and labels)
    names = list(input_pipeline._image_folder_classes(src, split))
    if classes is not None and names != classes:
      raise ValueError(f'{os.path.join(src, split)} has other classes than the first split '
                       f'({len(names)} vs {len(classes)}); give every split the same <class> '
                       'sub-folders.')
    classes = names
    paths, labels = input_pipeline._list_image_folder(src, split)  # pylint: disable=W0212
    order = np.random.default_rng([seed, len(paths)]).permutation(len(paths))
    num_shards = max(1, -(-len(paths) // shard_size))
    for shard, part in enumerate(np.array_split(order, num_shards)):
      path = os.path.join(dst, f'{name}-{split}.array_record-{shard:05d}-of-{num_shards:05d}')
      writer = array_record_module.ArrayRecordWriter(path, 'group_size:1')
      for i in part:
        with open(paths[i], 'rb') as f:
          writer.write(grain_pipeline.serialize_example(
              {'image': [f.read()], 'label': [labels[i]]}))
      writer.close()
    counts[split] = len(paths)
  with open(os.path.join(dst, 'label.labels.txt'), 'w', encoding='utf-8') as f:
    f.write(''.join(c + '\n' for c in classes or []))
  return counts


_SRC = flags.DEFINE_string('src', None, 'Image folder root: SRC/<split>/<class>/<image>.')
_DST = flags.DEFINE_string('dst', None, 'Output folder (created).')
_SPLITS = flags.DEFINE_list('splits', ['train'], 'Splits (sub-folders of --src) to convert.')
_NAME = flags.DEFINE_string('name', 'data', 'Dataset name, the prefix of the shard files.')
_SHARD_SIZE = flags.DEFINE_integer('shard_size', 10_000, 'Records per shard.')


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  if not _SRC.value or not _DST.value:
    raise app.UsageError('--src and --dst are required, e.g. python -m cjepa_jax.array_record '
                         '--src=data/cifar10 --dst=data/cifar10_ar --splits=train,test')
  counts = convert_image_folder(_SRC.value, _DST.value, _SPLITS.value, name=_NAME.value,
                                shard_size=_SHARD_SIZE.value)
  for split, n in counts.items():
    print(f'{split}: {n} records -> {_DST.value}/{_NAME.value}-{split}.array_record-*')


if __name__ == '__main__':
  app.run(main)
