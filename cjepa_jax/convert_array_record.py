r"""Converts an image folder into the ArrayRecord shards the grain loader reads.

  python -m cjepa_jax.convert_array_record --src=/data/imagenet21k --dst=/data/in21k_ar \
      --splits=train,val --name=in21k --shard_size=10000

(`cjepa-convert-array-record` once installed) reads `src/<split>/<class>/<image>` and writes
`dst/<name>-<split>.array_record-NNNNN-of-MMMMM` and `dst/label.labels.txt`; the format and the
order are described in `cjepa_jax/data/array_record.py`. Then train with

  --config.data.dataset=array_record --config.data.data_dir=dst

(the default grain loader). No TensorFlow is needed to write or to read.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from cjepa_jax import cli
from cjepa_jax.data import array_record

_PROG = 'cjepa-convert-array-record'


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
  p = argparse.ArgumentParser(
      prog=_PROG, description='Converts an image folder SRC/<split>/<class>/<image> into '
                              'ArrayRecord shards for --config.data.dataset=array_record.')
  p.add_argument('--src', required=True, help='Image folder root: SRC/<split>/<class>/<image>.')
  p.add_argument('--dst', required=True, help='Output folder (created).')
  p.add_argument('--splits', default='train',
                 help='Comma-separated splits (sub-folders of --src) to convert.')
  p.add_argument('--name', default='data', help='Dataset name, the prefix of the shard files.')
  p.add_argument('--shard_size', type=int, default=10_000, help='Records per shard.')
  return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> dict[str, int]:
  """Runs the conversion; returns {split: records written}. Raises ValueError on bad input."""
  args = _parse_args(argv)
  splits = [s for s in args.splits.split(',') if s]
  counts = array_record.convert_image_folder(args.src, args.dst, splits, name=args.name,
                                             shard_size=args.shard_size)
  for split, n in counts.items():
    print(f'{split}: {n} records -> {args.dst}/{args.name}-{split}.array_record-*')
  return counts


def run() -> None:
  """Console entry point: bad input prints the message (no traceback) and exits 1."""
  cli.run_plain(_PROG, main)


if __name__ == '__main__':
  run()
