r"""Throughput of the training input pipeline on this host (images per second).

Measures what one process can feed: decoding, RandomResizedCrop, normalisation and batching, with
the host-side numpy conversion; nothing is sent to a device. Example, on the shared CIFAR-10:

  dest=$(mktemp -d)/cifar10 && mkdir -p "$dest" \
    && tar -xzf ../shared/datasets/cifar10/train.tar.gz -C "$dest"
  python benchmarks/input_pipeline.py --dataset=image_folder --data_dir="$dest" \
    --image_size=32 --batch_size=256

On JPEGs of ImageNet's typical size that the script writes itself (500 x 375, 10 classes):

  python benchmarks/input_pipeline.py --generate=2000 --image_size=224 --batch_size=128 --json

Compare with the model's step time: the pipeline must produce `batch_size / step_time` images per
second per process (ImageNet ViT-H/14 reference: ~93 images/s per A100).
"""

import json
import os
import tempfile
import time

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '3')

from absl import app  # noqa: E402
from absl import flags  # noqa: E402

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

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
_GENERATE = flags.DEFINE_integer(
    'generate', 0, '> 0: write this many 500 x 375 JPEGs (10 classes) to a temporary image '
    'folder and read those (ImageNet-like decode cost); overrides --dataset/--data_dir.')
_JSON = flags.DEFINE_bool('json', False, 'Print the results as one JSON object, last line.')


def write_jpegs(root: str, count: int, size: tuple[int, int] = (500, 375), seed: int = 0) -> None:
  """`count` smooth random JPEGs (quality 90) in root/train/<class>/, like photographs to decode."""
  rng = np.random.default_rng(seed)
  w, h = size
  for i in range(count):
    folder = os.path.join(root, 'train', f'class_{i % 10}')
    os.makedirs(folder, exist_ok=True)
    coarse = rng.integers(0, 256, (h // 25 + 1, w // 25 + 1, 3), dtype=np.uint8)
    image = Image.fromarray(coarse).resize((w, h), Image.BILINEAR)  # Smooth, so JPEG-typical.
    image.save(os.path.join(folder, f'{i:06d}.jpg'), quality=90)


def main(argv):
  del argv
  input_pipeline.hide_accelerators_from_tf()
  config = config_lib.default_config()
  config.data.dataset = _DATASET.value
  config.data.data_dir = _DATA_DIR.value
  if _GENERATE.value:
    config.data.dataset = 'image_folder'
    config.data.data_dir = tempfile.mkdtemp(prefix='cjepa_jpegs_')
    write_jpegs(config.data.data_dir, _GENERATE.value)
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
  cores = len(os.sched_getaffinity(0))
  result = dict(dataset=config.data.dataset, generated=_GENERATE.value,
                image_size=_IMAGE_SIZE.value, batch_size=_BATCH_SIZE.value, cores=cores,
                images_per_s=images / elapsed, images_per_s_per_core=images / elapsed / cores,
                batch_ms=elapsed / _STEPS.value * 1e3, first_batch_s=first,
                start_step=_START_STEP.value, data_skipped=int(batch['data_skipped']))
  print(f'dataset={result["dataset"]} image_size={_IMAGE_SIZE.value} batch={_BATCH_SIZE.value} '
        f'cores={cores}')
  print(f'first batch (start-up, start_step={_START_STEP.value}): {first:.2f} s')
  print(f'{result["images_per_s"]:.0f} images/s = {result["images_per_s_per_core"]:.0f} per core '
        f'({result["batch_ms"]:.1f} ms per batch), data_skipped={result["data_skipped"]}')
  if _JSON.value:
    print(json.dumps(result))


if __name__ == '__main__':
  app.run(main)
