r"""Throughput of the training input pipeline on this host (images per second), both loaders.

Measures what one process can feed: decoding, RandomResizedCrop, normalisation and batching, with
the host-side numpy conversion; nothing is sent to a device. Each row is one loader on one
source, timed in turn in this process (grain first, so its rows run before TensorFlow is
imported):

  tf / image_folder      tf.data (config.data.loader='tf')
  grain / image_folder   grain + numpy / PIL (config.data.loader='grain'), the same files
  grain / array_record   grain over the same images converted to ArrayRecord shards

On the shared CIFAR-10 (32 px JPEGs):

  dest=$(mktemp -d)/cifar10 && mkdir -p "$dest" \
    && tar -xzf ../shared/datasets/cifar10/train.tar.gz -C "$dest"
  python benchmarks/input_pipeline.py --dataset=image_folder --data_dir="$dest" \
    --image_size=32 --batch_size=256 --array_record

On JPEGs of ImageNet's typical size that the script writes itself (500 x 375, 10 classes; then
also as ArrayRecord):

  python benchmarks/input_pipeline.py --generate=2000 --image_size=224 --batch_size=128 --json

Compare with the model's step time: the pipeline must produce `batch_size / step_time` images per
second per process (ImageNet ViT-H/14 reference: ~93 images/s per A100). On a shared machine the
figures are noisy: run it several times (or alternate `--loaders=tf` and `--loaders=grain` runs)
and quote medians.
"""

import json
import os
import sys
import tempfile
import time

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '3')

from absl import app  # noqa: E402
from absl import flags  # noqa: E402

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from cjepa_jax.data import array_record  # noqa: E402
from cjepa_jax import config as config_lib  # noqa: E402
from cjepa_jax.data import input_pipeline  # noqa: E402
from cjepa_jax.data.spec import DataSpec  # noqa: E402

_DATASET = flags.DEFINE_string('dataset', 'synthetic', "tfds name, 'image_folder' or 'synthetic'.")
_DATA_DIR = flags.DEFINE_string('data_dir', '', 'tfds data_dir or image-folder root.')
_SPLIT = flags.DEFINE_string('split', 'train', 'Training split.')
_IMAGE_SIZE = flags.DEFINE_integer('image_size', 224, 'Output resolution.')
_BATCH_SIZE = flags.DEFINE_integer('batch_size', 256, 'Batch of this process.')
_WARMUP = flags.DEFINE_integer('warmup_steps', 5, 'Batches not timed (graph building, buffers).')
_STEPS = flags.DEFINE_integer('steps', 50, 'Timed batches.')
_START_STEP = flags.DEFINE_integer('start_step', 0, 'Also times a resume at this step.')
_GENERATE = flags.DEFINE_integer(
    'generate', 0, '> 0: write this many JPEGs (10 classes, --generate_size) to a temporary '
    'image folder and read those (ImageNet-like decode cost), and their ArrayRecord conversion; '
    'overrides --dataset/--data_dir.')
_GENERATE_SIZE = flags.DEFINE_list('generate_size', ['500', '375'],
                                   'Width, height of the generated JPEGs.')
_LOADERS = flags.DEFINE_list('loaders', ['grain', 'tf'], 'Loaders to time, in this order.')
_ARRAY_RECORD = flags.DEFINE_bool(
    'array_record', False, 'Also convert the image folder to ArrayRecord (temporary) and time '
    'grain on it (always on with --generate).')
_WORKERS = flags.DEFINE_integer('workers', 0, 'grain decoding threads (0: twice the cores).')
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


def time_loader(config) -> dict:
  """Images/s of `config`'s training iterator (after start-up and warm-up batches)."""
  start = time.perf_counter()
  it = input_pipeline.make_train_iterator(
      DataSpec.from_config(config), start_step=_START_STEP.value, process_index=0, process_count=1)
  next(it)
  first = time.perf_counter() - start
  for _ in range(_WARMUP.value):
    next(it)
  start = time.perf_counter()
  for _ in range(_STEPS.value):
    batch = next(it)
  elapsed = time.perf_counter() - start
  del it
  images = _STEPS.value * _BATCH_SIZE.value
  cores = len(os.sched_getaffinity(0))
  return dict(images_per_s=images / elapsed, images_per_s_per_core=images / elapsed / cores,
              batch_ms=elapsed / _STEPS.value * 1e3, first_batch_s=first,
              data_skipped=int(batch['data_skipped']))


def main(argv):
  del argv
  config = config_lib.default_config()
  config.data.dataset = _DATASET.value
  config.data.data_dir = _DATA_DIR.value
  config.data.workers = _WORKERS.value
  convert = _ARRAY_RECORD.value
  if _GENERATE.value:
    config.data.dataset = 'image_folder'
    config.data.data_dir = tempfile.mkdtemp(prefix='cjepa_jpegs_')
    write_jpegs(config.data.data_dir, _GENERATE.value,
                tuple(int(x) for x in _GENERATE_SIZE.value))
    convert = True
  config.data.train_split = _SPLIT.value
  config.data.image_size = _IMAGE_SIZE.value
  config.batch_size = _BATCH_SIZE.value
  rows = [(loader, config.data.dataset) for loader in _LOADERS.value]
  ar_dir = None
  if convert and 'grain' in _LOADERS.value and config.data.dataset == 'image_folder':
    ar_dir = tempfile.mkdtemp(prefix='cjepa_ar_')
    array_record.convert_image_folder(config.data.data_dir, ar_dir, [_SPLIT.value])
    rows.insert(_LOADERS.value.index('grain') + 1, ('grain', 'array_record'))

  cores = len(os.sched_getaffinity(0))
  result = dict(dataset=config.data.dataset, generated=_GENERATE.value,
                image_size=_IMAGE_SIZE.value, batch_size=_BATCH_SIZE.value, cores=cores,
                start_step=_START_STEP.value, loaders={})
  print(f'dataset={result["dataset"]} image_size={_IMAGE_SIZE.value} batch={_BATCH_SIZE.value} '
        f'cores={cores} start_step={_START_STEP.value}')
  print(f'{"loader / source":24s} {"images/s":>9s} {"per core":>9s} {"ms/batch":>9s} '
        f'{"first batch s":>14s} skipped')
  for loader, dataset in rows:
    c = config.copy_and_resolve_references()
    c.data.loader = loader
    if dataset == 'array_record' and ar_dir:  # The conversion made here.
      c.data.dataset, c.data.data_dir = 'array_record', ar_dir
    r = time_loader(c)
    r['tensorflow_imported'] = 'tensorflow' in sys.modules
    result['loaders'][f'{loader}/{dataset}'] = r
    print(f'{loader + " / " + dataset:24s} {r["images_per_s"]:9.0f} '
          f'{r["images_per_s_per_core"]:9.0f} {r["batch_ms"]:9.1f} {r["first_batch_s"]:14.2f} '
          f'{r["data_skipped"]}')
  if _JSON.value:
    print(json.dumps(result))


if __name__ == '__main__':
  app.run(main)
