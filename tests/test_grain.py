"""The grain loader (config.data.loader='grain'): values, global shuffle, exact resume, corrupt
images, evaluation, the ArrayRecord converter, and runs with TensorFlow unimportable."""

import io
import json
import os
import pathlib
import subprocess
import sys

import numpy as np
from PIL import Image
import pytest

from cjepa_jax import config as config_lib
from cjepa_jax.data import array_record
from cjepa_jax.data import augment
from cjepa_jax.data import image_folder
from cjepa_jax.data import input_pipeline as ip
from cjepa_jax.data import sources
from cjepa_jax.data.spec import DataSpec

from multiprocess_utils import xla_flags

ROOT = pathlib.Path(__file__).resolve().parents[1]
MEAN = np.array([0.485, 0.456, 0.406], np.float32)
STD = np.array([0.229, 0.224, 0.225], np.float32)

# Makes every `import tensorflow` fail with ModuleNotFoundError, as if it were not installed.
# (sys.modules['tensorflow'] = None would also block it, but tfds then believes TensorFlow is
# loaded and breaks; raising from find_spec breaks etils' `importlib.util.find_spec` probe.)
BLOCK_TF = '''
import importlib.abc, importlib.machinery, sys
class _NoTensorFlow(importlib.abc.MetaPathFinder, importlib.abc.Loader):
  def find_spec(self, name, path=None, target=None):
    if name == 'tensorflow' or name.startswith('tensorflow.'):
      return importlib.machinery.ModuleSpec(name, self)
  def create_module(self, spec):
    raise ModuleNotFoundError(f'No module named {spec.name!r} (blocked by the test)')
  def exec_module(self, module):
    raise AssertionError('unreachable')
sys.meta_path.insert(0, _NoTensorFlow())
'''


def _write_flat_folder(root: pathlib.Path, split: str, n: int) -> None:
  """n flat PNGs of red value 5 + 3 i (image id i, recoverable after normalisation), 3 classes."""
  for i in range(n):
    folder = root / split / f'class_{i % 3}'
    folder.mkdir(parents=True, exist_ok=True)
    image = np.zeros((20 + i % 5, 24, 3), np.uint8)
    image[..., 0] = 5 + 3 * i
    Image.fromarray(image).save(folder / f'{i:03d}.png')


def _ids(images: np.ndarray) -> np.ndarray:
  red = images[..., 0].mean(axis=(1, 2)) * STD[0] + MEAN[0]
  return np.round((red * 255 - 5) / 3).astype(int)


def _config(data_dir, **data):
  c = config_lib.default_config()
  c.data.update(dataset='image_folder', data_dir=str(data_dir), image_size=8, loader='grain',
                num_classes=3, eval_split='val', workers=2)
  c.data.update(data)
  c.batch_size = 6
  return c



def _data(config):
  """The input's spec of `config`, as the trainers read it."""
  return DataSpec.from_config(config)

def _take(it, n):
  return [next(it) for _ in range(n)]


@pytest.fixture(scope='module')
def folder(tmp_path_factory):
  root = tmp_path_factory.mktemp('flat')
  _write_flat_folder(root, 'train', 24)
  _write_flat_folder(root, 'val', 11)
  return root


def test_global_shuffle_covers_each_epoch_once_across_processes(folder):
  c = _config(folder)  # 24 examples, global batch 6: 4 steps per epoch.
  steps = {}
  for p in (0, 1):
    batches = _take(ip.make_train_iterator(_data(c), process_index=p, process_count=2), 8)
    steps[p] = [_ids(b['image']) for b in batches]
    for b in batches:
      np.testing.assert_array_equal(b['label'], _ids(b['image']) % 3)
  one = [_take(ip.make_train_iterator(_data(c), process_index=0, process_count=1), 8)]
  for s in range(8):  # Step s's global batch is the same whatever the process count.
    np.testing.assert_array_equal(np.concatenate([steps[0][s], steps[1][s]]),
                                  _ids(one[0][s]['image']))
    resumed = ip.make_train_iterator(_data(c), start_step=s, process_index=0, process_count=2)
    np.testing.assert_array_equal(one[0][s]['image'][:3], _take(resumed, 1)[0]['image'])
  epoch0 = np.concatenate([_ids(b['image']) for b in one[0][:4]])
  epoch1 = np.concatenate([_ids(b['image']) for b in one[0][4:]])
  assert sorted(epoch0) == sorted(epoch1) == list(range(24))  # Each example once per epoch.
  assert not np.array_equal(epoch0, epoch1)  # A fresh permutation per epoch.
  c.seed = 1
  other = np.concatenate([_ids(b['image']) for b in _take(
      ip.make_train_iterator(_data(c), process_index=0, process_count=1), 4)])
  assert not np.array_equal(other, epoch0)


def test_exact_resume_with_augmentations_and_worker_count(folder):
  c = _config(folder, flip=True, color_jitter=0.4, grayscale=0.3, blur=0.5, image_size=12)
  full = _take(ip.make_train_iterator(_data(c), process_index=1, process_count=2), 7)
  c.data.workers = 1  # Other thread count: same batches.
  resumed = _take(
      ip.make_train_iterator(_data(c), start_step=5, process_index=1, process_count=2), 2)
  for a, b in zip(full[5:], resumed):
    np.testing.assert_array_equal(a['image'], b['image'])
    np.testing.assert_array_equal(a['label'], b['label'])


def test_random_resized_crop_window_matches_torchvision_rule():
  rng = np.random.default_rng(0)
  for _ in range(200):
    top, left, h, w = augment.random_resized_crop_window(300, 400, rng, scale=(0.3, 1.0),
                                                         ratio=(3 / 4, 4 / 3))
    assert 0 <= top <= 300 - h and 0 <= left <= 400 - w
    assert 0.3 * 120000 * 0.98 <= h * w <= 120000
    assert 3 / 4 * 0.95 <= w / h <= 4 / 3 * 1.05
  # No draw can fit: torchvision's fallback, the centre crop with the aspect clamped to `ratio`.
  assert augment.random_resized_crop_window(100, 400, rng, scale=(1.0, 1.0), ratio=(0.9, 1.1)) == (
      0, 145, 100, 110)
  assert augment.random_resized_crop_window(400, 100, rng, scale=(1.0, 1.0), ratio=(0.9, 1.1)) == (
      144, 0, 111, 100)


def test_train_crop_equals_pil_reference_of_the_same_box(tmp_path):
  """The pipeline's image == PIL crop of the box drawn from rng(seed, AUGMENT, position), resized,
  normalised: a numpy reference of the same crop."""
  image = np.random.default_rng(1).integers(0, 256, (37, 45, 3), dtype=np.uint8)
  (tmp_path / 'train' / 'a').mkdir(parents=True)
  (tmp_path / 'train' / 'b').mkdir(parents=True)
  Image.fromarray(image).save(tmp_path / 'train' / 'a' / 'x.png')
  Image.fromarray(image).save(tmp_path / 'train' / 'b' / 'y.png')
  c = _config(tmp_path, image_size=16, interpolation='bicubic')
  c.batch_size = 2
  got = next(ip.make_train_iterator(_data(c), process_index=0, process_count=1))['image']
  for g in range(2):
    rng = np.random.default_rng([c.seed, augment._AUGMENT, g])  # pylint: disable=protected-access
    top, left, h, w = augment.random_resized_crop_window(37, 45, rng, scale=c.data.crop_scale,
                                                         ratio=c.data.crop_ratio)
    ref = Image.fromarray(image).crop((left, top, left + w, top + h)).resize((16, 16),
                                                                              Image.BICUBIC)
    ref = (np.asarray(ref, np.float32) / 255 - MEAN) / STD
    np.testing.assert_allclose(got[g], ref, atol=1e-6)


def test_corrupt_images_keep_their_slot_are_counted_and_resume(tmp_path):
  _write_flat_folder(tmp_path, 'train', 12)
  bad = sorted((tmp_path / 'train' / 'class_0').iterdir())[:2]
  for path in bad:
    path.write_bytes(b'not an image')
  c = _config(tmp_path)
  c.batch_size = 4
  batches = _take(ip.make_train_iterator(_data(c), process_index=0, process_count=1), 6)
  assert batches[-1]['data_skipped'] == 4  # 2 corrupt files, 2 epochs.
  for b in batches:
    assert set(_ids(b['image'])) <= set(range(12)) - {0, 3}  # Slots filled from the same batch.
  resumed = _take(
      ip.make_train_iterator(_data(c), start_step=3, process_index=0, process_count=1), 3)
  for a, b in zip(batches[3:], resumed):
    np.testing.assert_array_equal(a['image'], b['image'])
  evals = list(ip.make_eval_iterator(_data(c), 'train', batch_size=5, process_index=0,
                                     process_count=1))
  assert sum(int(b['valid'].sum()) for b in evals) == 10 and evals[-1]['data_skipped'] == 2


def test_eval_pads_covers_once_and_matches_pil(folder):
  c = _config(folder)
  assert ip.num_examples(_data(c), 'val') == 11
  paths = image_folder.list_images(str(folder), 'val')[0]
  id_of_pos = np.array([int(pathlib.Path(f).stem) for f in paths])
  pos = []
  counts = []
  for p in (0, 1):
    batches = list(ip.make_eval_iterator(_data(c), 'val', batch_size=8, process_index=p,
                                         process_count=2))
    counts.append(len(batches))
    for b in batches:
      v = b['valid']
      np.testing.assert_array_equal(_ids(b['image'][v]), id_of_pos[b['pos'][v]])
      assert (b['pos'][~v] == -1).all()
      pos.extend(b['pos'][v])
  assert counts == [2, 2] and sorted(pos) == list(range(11))
  sub = list(ip.make_eval_iterator(_data(c), 'val', batch_size=4, process_index=0, process_count=1,
                                   num_examples=5))
  assert sum(int(b['valid'].sum()) for b in sub) == 5
  # Short side 20 -> round(256 * 8 / 224) = 9, long 24 -> int(9 * 24 / 20) = 10, centre 8x8.
  image = np.random.default_rng(2).integers(0, 256, (20, 24, 3), dtype=np.uint8)
  ref = Image.fromarray(image).resize((10, 9), Image.BILINEAR).crop((1, 0, 9, 8))
  out = augment.eval_transform(dict(pixels=image), augment.Preprocess.from_spec(_data(c)),
                               ip.eval_resize_size(_data(c)))
  np.testing.assert_allclose(out, (np.asarray(ref, np.float32) / 255 - MEAN) / STD, atol=1e-6)


def test_synthetic_is_a_function_of_position():
  c = _config('', dataset='synthetic', num_classes=10)
  a = _take(ip.make_train_iterator(_data(c), process_index=0, process_count=1), 3)
  b = _take(ip.make_train_iterator(_data(c), start_step=2, process_index=0, process_count=1), 1)
  np.testing.assert_array_equal(a[2]['image'], b[0]['image'])
  assert ip.num_examples(_data(c), 'validation') == sources.SYNTHETIC_EVAL_EXAMPLES
  ev = list(ip.make_eval_iterator(_data(c), 'validation', batch_size=4, num_examples=6,
                                  process_index=0, process_count=1))
  assert [int(x['valid'].sum()) for x in ev] == [4, 2]


def test_example_proto_round_trip():
  record = array_record.serialize_example(
      {'image': [b'\x00\xffjpeg'], 'label': [7], 'neg': [-3, 2 ** 40]})
  assert array_record.parse_example(record) == {'image': [b'\x00\xffjpeg'], 'label': [7],
                                                'neg': [-3, 2 ** 40]}


def test_image_folder_to_array_record_converter(folder, tmp_path):
  dst = tmp_path / 'ar'
  counts = array_record.convert_image_folder(str(folder), str(dst), ['train', 'val'],
                                             name='flat', shard_size=10)
  assert counts == {'train': 24, 'val': 11}
  assert len(list(dst.glob('flat-train.array_record-*-of-00003'))) == 3
  c = _config(dst, dataset='array_record')
  assert ip.class_names(_data(c), 'train') == ['class_0', 'class_1', 'class_2']
  assert ip.check_label_splits(_data(c)) == ['class_0', 'class_1', 'class_2']
  assert ip.num_examples(_data(c), 'train') == 24
  ip.check_dataset(_data(c))
  batches = _take(ip.make_train_iterator(_data(c), process_index=0, process_count=1), 4)
  ids = np.concatenate([_ids(b['image']) for b in batches])
  assert sorted(ids) == list(range(24))
  np.testing.assert_array_equal(np.concatenate([b['label'] for b in batches]), ids % 3)
  evals = list(ip.make_eval_iterator(_data(c), 'val', batch_size=4, process_index=0,
                                     process_count=1))
  valid = np.concatenate([b['valid'] for b in evals])
  labels = np.concatenate([b['label'] for b in evals])[valid]
  images = np.concatenate([b['image'] for b in evals])[valid]
  np.testing.assert_array_equal(labels, _ids(images) % 3)
  with pytest.raises(ValueError, match='loader=grain'):
    ip.make_train_iterator(_data(_config(dst, dataset='array_record', loader='tf')))
  with pytest.raises(ValueError, match='No ArrayRecord shards'):
    ip.check_dataset(_data(_config(tmp_path, dataset='array_record')))


def test_grain_path_never_imports_tensorflow(folder):
  code = BLOCK_TF + f'''
from cjepa_jax import config as config_lib
from cjepa_jax.data import input_pipeline as ip, lazy_tf
from cjepa_jax.data.spec import DataSpec
_data = DataSpec.from_config
c = config_lib.default_config()
c.data.update(dataset='image_folder', data_dir={str(folder)!r}, image_size=8, loader='grain',
              num_classes=3, eval_split='val')
c.batch_size = 4
lazy_tf.hide_accelerators_from_tf()
ip.check_dataset(_data(c)); ip.check_label_splits(_data(c))
next(ip.make_train_iterator(_data(c), process_index=0, process_count=1))
list(ip.make_eval_iterator(_data(c), 'val', batch_size=4, process_index=0, process_count=1))
assert 'tensorflow' not in sys.modules
c.data.loader = 'tf'
try:
  ip.check_dataset(_data(c))
except ValueError as e:  # One line for the command lines (cli.USER_ERRORS).
  print('ERROR', e)
'''
  env = dict(os.environ, PYTHONPATH=str(ROOT), JAX_PLATFORMS='cpu')
  out = subprocess.run([sys.executable, '-c', code], env=env, capture_output=True, text=True,
                       timeout=300)
  assert out.returncode == 0, out.stderr[-3000:]
  assert "ERROR config.data.loader='tf' needs tensorflow" in out.stdout
  assert "pip install -e '.[tf]'" in out.stdout


def test_parse_example_reads_what_pil_wrote():
  buf = io.BytesIO()
  Image.fromarray(np.full((4, 5, 3), 9, np.uint8)).save(buf, format='PNG')
  ex = array_record.parse_example(
      array_record.serialize_example({'image': [buf.getvalue()], 'label': [1]}))
  assert np.asarray(Image.open(io.BytesIO(ex['image'][0]))).shape == (4, 5, 3)
  assert json.dumps(ex['label']) == '[1]'


# ------------------------------------------------------------------------------------------------
# The command lines with TensorFlow unimportable: train, SIGKILL, resume == straight; probe;
# fine-tune.
# ------------------------------------------------------------------------------------------------

_KILL_AT_SAVE = '''
import os, signal
from cjepa_jax import train
from cjepa_jax.checkpoint import manager as ckpt_manager
kill_step = int(os.environ.get('KILL_AT', '0'))
original = ckpt_manager.Checkpointer.save
def save(self, step, state, config=None, **kwargs):
  if step == kill_step:
    self.wait()
  result = original(self, step, state, config, **kwargs)
  if step == kill_step:
    os.kill(os.getpid(), signal.SIGKILL)   # The async save is still in flight.
  return result
ckpt_manager.Checkpointer.save = save
'''


def _run(code: str, *args, **env_extra):
  env = dict(os.environ, XLA_FLAGS=xla_flags(1),
             JAX_PLATFORMS='cpu', PYTHONPATH=str(ROOT), **env_extra)
  return subprocess.run([sys.executable, '-c', BLOCK_TF + code, *args], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=600)


def _entry(module: str, harness: str = '') -> str:
  return harness + f'''
from cjepa_jax import {module}
sys.argv = ['{module}'] + sys.argv[1:]
try:
  {module}.run()
finally:
  assert 'tensorflow' not in sys.modules, 'TensorFlow was imported'
'''


@pytest.fixture(scope='module')
def cifar_like(tmp_path_factory):
  """A 10-class image folder of 32 px JPEGs (train: 8 per class, test: 2 per class)."""
  root = tmp_path_factory.mktemp('cifar_like')
  rng = np.random.default_rng(0)
  for split, per_class in (('train', 8), ('test', 2)):
    for k in range(10):
      folder = root / split / f'class_{k}'
      folder.mkdir(parents=True)
      for i in range(per_class):
        image = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
        Image.fromarray(image).save(folder / f'{i}.jpg', quality=90)
  return root


def _train_args(workdir, data_dir, *extra):
  return ['--config', 'configs/cifar10_vit_tiny.py', '--workdir', str(workdir),
          '--config.data.loader=grain', f'--config.data.data_dir={data_dir}',
          '--config.batch_size=16', '--config.model.depth=1', '--config.model.pred_depth=1',
          '--config.model.pred_width=48', '--config.log_every_steps=2',
          '--config.evals.knn.every_steps=0', '--config.total_steps=8',
          '--config.ckpt_every_steps=3', *extra]


@pytest.mark.slow
def test_cli_train_killed_resumed_exact_then_probe_and_finetune_without_tensorflow(
    cifar_like, tmp_path):
  from cjepa_jax.checkpoint import reading as ckpt_reading  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  straight, run = tmp_path / 'straight', tmp_path / 'run'
  result = _run(_entry('train'), *_train_args(straight, cifar_like))
  assert result.returncode == 0, result.stderr[-3000:]
  killed = _run(_entry('train', _KILL_AT_SAVE), *_train_args(run, cifar_like), KILL_AT='6')
  assert killed.returncode == -9, killed.stderr[-3000:]  # SIGKILL while step 6 is saved.
  resumed = _run(_entry('train'), *_train_args(run, cifar_like))
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  assert 'Resuming from the checkpoint of step 3' in resumed.stderr
  rows = [[json.loads(line) for line in open(w / 'metrics.jsonl', encoding='utf-8')]
          for w in (straight, run)]
  a, b = ({r['step']: r for r in rs} for rs in rows)
  for step in (6, 8):
    for key in ('loss', 'grad_norm', 'param_norm'):
      assert a[step][key] == b[step][key], (step, key)
  for x, y in zip(jax.tree.leaves(ckpt_reading.restore_subtree(str(straight), ())),
                  jax.tree.leaves(ckpt_reading.restore_subtree(str(run), ())), strict=True):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))

  probe = _run(_entry('probe'), '--config', 'configs/probe_linear.py',
               f'--config.pretrained={straight}', '--workdir', str(tmp_path / 'probe'),
               '--config.data.loader=grain', f'--config.data.data_dir={cifar_like}',
               '--config.probes=knn')
  assert probe.returncode == 0, probe.stderr[-3000:]
  assert (tmp_path / 'probe' / 'probe_results.json').exists()

  finetune = _run(_entry('finetune'), '--config', 'configs/finetune_cifar10.py',
                  '--config.pretrained=random', '--config.data.loader=grain',
                  f'--config.data.data_dir={cifar_like}', '--config.batch_size=16',
                  '--config.total_steps=2', '--config.model.depth=1',
                  '--config.log_every_steps=1', '--config.eval_every_steps=2',
                  '--config.eval_batch_size=16', '--config.optim.warmup_steps=1',
                  '--workdir', str(tmp_path / 'ft'))
  assert finetune.returncode == 0, finetune.stderr[-3000:]

  # The tf.data loader without TensorFlow: one line naming the extra, before any workdir exists.
  no_tf = _run(_entry('train'), *_train_args(tmp_path / 'tf_run', cifar_like,
                                             '--config.data.loader=tf'))
  assert no_tf.returncode == 1
  assert no_tf.stderr.strip().splitlines()[-1].startswith(
      "cjepa-train: error: config.data.loader='tf' needs tensorflow, which is not installed: "
      "pip install -e '.[tf]'"), no_tf.stderr[-2000:]
  assert not (tmp_path / 'tf_run').exists()


def test_tfds_array_record_data_source(tmp_path):
  """A tfds dataset prepared with file_format='array_record' reads through tfds.data_source
  (dataset=<tfds name>) and, identically, as plain shards (dataset='array_record')."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top  (prepares only)

  class CjepaGrainFlat(tfds.core.GeneratorBasedBuilder):
    VERSION = tfds.core.Version('1.0.0')

    def _info(self):
      return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
          'image': tfds.features.Image(shape=(None, None, 3)),
          'label': tfds.features.ClassLabel(num_classes=3)}))

    def _split_generators(self, dl_manager):
      del dl_manager
      return {'train': self._generate_examples(24), 'test': self._generate_examples(5)}

    def _generate_examples(self, n):
      for i in range(n):
        image = np.zeros((20 + i % 5, 24, 3), np.uint8)
        image[..., 0] = 5 + 3 * i
        yield i, {'image': image, 'label': i % 3}

  CjepaGrainFlat(data_dir=str(tmp_path)).download_and_prepare(
      file_format='array_record', download_config=tfds.download.DownloadConfig(num_shards=None))
  c = _config(tmp_path, dataset='cjepa_grain_flat', eval_split='test')
  assert ip.num_examples(_data(c), 'train') == 24
  assert ip.check_label_splits(_data(c)) == ['0', '1', '2']
  batches = _take(ip.make_train_iterator(_data(c), process_index=0, process_count=1), 4)
  ids = np.concatenate([_ids(b['image']) for b in batches])
  assert sorted(ids) == list(range(24))
  np.testing.assert_array_equal(np.concatenate([b['label'] for b in batches]), ids % 3)
  shards = _config(tmp_path / 'cjepa_grain_flat' / '1.0.0', dataset='array_record')
  assert ip.class_names(_data(shards), 'train') == ['0', '1', '2']
  np.testing.assert_array_equal(
      next(ip.make_train_iterator(_data(shards), process_index=0, process_count=1))['image'],
      batches[0]['image'])
  evals = list(ip.make_eval_iterator(_data(c), 'test', batch_size=4, process_index=0,
                                     process_count=1))
  assert [int(b['valid'].sum()) for b in evals] == [4, 1]
