r"""Throughput of the training input pipeline on this host (images per second).

Measures what one process can feed: decoding, RandomResizedCrop, normalisation and batching, with
the host-side numpy conversion; nothing is sent to a device. Example, on the shared CIFAR-10:

  dest=$(mktemp -d)/cifar10 && mkdir -p "$dest" \
    && tar -xzf ../shared/datasets/cifar10/train.tar.gz -C "$dest"
  python benchmarks/input_pipeline.py --dataset=image_folder --data_dir="$dest" \
    --image_size=32 --batch_size=256

Compare with the model's step time: the pipeline must produce `batch_size / step_time` images per
second per process (ImageNet ViT-H/14 reference: ~93 images/s per A100).
"""

import os
import time

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '3')

from absl import app  # noqa: E402
from absl import flags  # noqa: E402

from cjepa_jax import config as config_lib  # noqa: E402
from cjepa_jax import input_pipeline  # noqa: E402

_DATASET = flags.DEFINE_string('dataset', 'synthetic', "tfds name, 'image_folder' or 'synthetic'.")
_DATA_DIR = flags.DEFINE_string('data_dir', '', 'tfds data_dir or image-folder root.')
_SPLIT = flags.DEFINE_string('split', 'train', 'Training split.')
_IMAGE_SIZE = flags.DEFINE_integer('image_size', 224, 'Output resolution.')
_BATCH_SIZE = flags.DEFINE_integer('batch_size', 256, 'Batch of this process.')
_WARMUP = flags.DEFINE_integer('warmup_steps', 5, 'Batches not timed (graph building, buffers).')
_STEPS = flags.DEFINE_integer('steps', 50, 'Timed batches.')
_START_STEP = flags.DEFINE_integer('start_step', 0, 'Also times a resume at this step.')


def main(argv):
  del argv
  config = config_lib.default_config()
  config.data.dataset = _DATASET.value
  config.data.data_dir = _DATA_DIR.value
  config.data.train_split = _SPLIT.value
  config.data.image_size = _IMAGE_SIZE.value
  config.batch_size = _BATCH_SIZE.value

  start = time.perf_counter()
  it = input_pipeline.make_train_iterator(
      config, start_step=_START_STEP.value, process_index=0, process_count=1)
  next(it)
  first = time.perf_counter() - start
  for _ in range(_WARMUP.value):
    next(it)
  start = time.perf_counter()
  for _ in range(_STEPS.value):
    batch = next(it)
  elapsed = time.perf_counter() - start
  images = _STEPS.value * _BATCH_SIZE.value
  print(f'dataset={_DATASET.value} image_size={_IMAGE_SIZE.value} batch={_BATCH_SIZE.value} '
        f'cores={len(os.sched_getaffinity(0))}')
  print(f'first batch (start-up, start_step={_START_STEP.value}): {first:.2f} s')
  print(f'{images / elapsed:.0f} images/s ({elapsed / _STEPS.value * 1e3:.1f} ms per batch), '
        f'data_skipped={batch["data_skipped"]}')


if __name__ == '__main__':
  app.run(main)
