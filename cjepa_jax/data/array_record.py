r"""ArrayRecord datasets: the record format, the shard files, the class names, and the converter
from an image folder.

Layout (a tfds dataset prepared with `--file_format=array_record` has it too; point data_dir at
its version folder):

  data_dir/<name>-<split>.array_record-00000-of-000NN   serialized tf.train.Example records:
                                                        'image' (encoded bytes), 'label' (int64)
  data_dir/label.labels.txt                             class names, one a line, in label order

`convert_image_folder` writes it from `src/<split>/<class>/<image>` (classes sorted -> label ids,
as the image-folder loader numbers them), keeping each file's bytes, in a seeded random order (a
shard or a prefix of the split is a random sample; the loader still shuffles globally). The
command line is `cjepa-convert-array-record` (cjepa_jax/convert_array_record.py). No TensorFlow is
needed to write or to read: the tf.train.Example wire format is written and parsed here.
"""

from __future__ import annotations

import glob
import json
import os
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

from cjepa_jax.data import image_folder


def shard_files(data_dir: str, split: str) -> list[str]:
  """The sorted shards `data_dir/*<split>.array_record*` (tfds and converter naming)."""
  files = sorted(f for f in glob.glob(os.path.join(data_dir, f'*{split}.array_record*'))
                 if os.path.basename(f).split('.array_record')[0].split('-')[-1] == split)
  if not files:
    raise ValueError(
        f'No ArrayRecord shards of split {split!r} in {data_dir!r} (expected '
        f'<name>-{split}.array_record-00000-of-000NN); convert an image folder with '
        '`cjepa-convert-array-record --src=<folder> --dst=<data_dir>` or prepare a tfds dataset '
        'with `tfds build <name> --file_format=array_record` and point data_dir at its version '
        'folder.')
  return files


def class_names(data_dir: str) -> list[str]:
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
# The converter.
# ------------------------------------------------------------------------------------------------


def convert_image_folder(src: str, dst: str, splits: Sequence[str], *, name: str = 'data',
                         shard_size: int = 10_000, seed: int = 0) -> dict[str, int]:
  """Writes the ArrayRecord shards of `splits` of the image folder `src` to `dst`.

  Every split must have the same class sub-folders (their label ids must mean the same class).

  Returns:
    dict(split -> number of records written).
  """
  from array_record.python import array_record_module  # pylint: disable=g-import-not-at-top
  if shard_size <= 0:
    raise ValueError(f'shard_size must be positive, got {shard_size}.')
  classes = None
  counts = {}
  os.makedirs(dst, exist_ok=True)
  for split in splits:
    names = list(image_folder.list_classes(src, split))  # The loaders' own label numbering.
    if classes is not None and names != classes:
      raise ValueError(f'{os.path.join(src, split)} has other classes than the first split '
                       f'({len(names)} vs {len(classes)}); give every split the same <class> '
                       'sub-folders.')
    classes = names
    paths, labels = image_folder.list_images(src, split)
    order = np.random.default_rng([seed, len(paths)]).permutation(len(paths))
    num_shards = max(1, -(-len(paths) // shard_size))
    for shard, part in enumerate(np.array_split(order, num_shards)):
      path = os.path.join(dst, f'{name}-{split}.array_record-{shard:05d}-of-{num_shards:05d}')
      writer = array_record_module.ArrayRecordWriter(path, 'group_size:1')
      for i in part:
        with open(paths[i], 'rb') as f:
          writer.write(serialize_example(
              {'image': [f.read()], 'label': [labels[i]]}))
      writer.close()
    counts[split] = len(paths)
  with open(os.path.join(dst, 'label.labels.txt'), 'w', encoding='utf-8') as f:
    f.write(''.join(c + '\n' for c in classes or []))
  return counts
