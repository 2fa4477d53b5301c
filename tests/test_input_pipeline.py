"""Tests of the input pipeline on small image folders written here, mocked tfds and CIFAR-10.

Most images are flat colours that encode their identity (red = 5 + 7 * id, green = 40 + 70 *
label): whatever the crop, a decoded training image is constant, so the id of every example in a
batch can be read back from its pixels. That lets the tests check exactly which files each process
reads, per-epoch coverage, resumption and evaluation coverage through the public API.
"""

import pathlib
import tarfile

import jax
import numpy as np
from PIL import Image
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

from cjepa_jax import config as config_lib
from cjepa_jax.data import input_pipeline as ip
from cjepa_jax.data import sources
from cjepa_jax.data import tf_augment
from cjepa_jax.data import tf_loader
from cjepa_jax.data.spec import DataSpec

CLASSES = ('ant', 'bee', 'cat')
SIZES = ((40, 30), (64, 48))  # (width, height), alternating.
MEAN = np.array((0.485, 0.456, 0.406))
STD = np.array((0.229, 0.224, 0.225))


def _colour(example_id: int, label: int) -> tuple[int, int, int]:
  return (5 + 7 * example_id, 40 + 70 * label, 128)


def _write_flat_folder(root: pathlib.Path, split: str, per_class: int) -> dict[int, pathlib.Path]:
  """Flat-colour JPEGs root/split/<class>/<id>.jpg; returns id -> path."""
  files, example_id = {}, 0
  for label, cls in enumerate(CLASSES):
    (root / split / cls).mkdir(parents=True)
    for _ in range(per_class):
      size = SIZES[example_id % 2]
      path = root / split / cls / f'{example_id:03d}.jpg'
      Image.new('RGB', size, _colour(example_id, label)).save(path, quality=95)
      files[example_id] = path
      example_id += 1
  return files


def _config(data_dir, **data) -> config_lib.ml_collections.ConfigDict:
  c = config_lib.default_config()
  c.data.loader = 'tf'  # This file tests the tf.data loader (tests/test_grain.py: grain).
  c.batch_size = 6
  c.data.dataset = 'image_folder'
  c.data.data_dir = str(data_dir)
  c.data.image_size = 8
  c.data.eval_split = 'val'
  c.data.update(data)
  return c


def _ids(images: np.ndarray) -> np.ndarray:
  """Example ids of flat-colour images [b, H, W, 3] (normalised) from their red channel."""
  red = (images[..., 0].mean(axis=(1, 2)) * STD[0] + MEAN[0]) * 255
  return np.round((red - 5) / 7).astype(int)



def _data(config):
  """The input's spec of `config`, as the trainers read it."""
  return DataSpec.from_config(config)

def _take(it, n):
  return [next(it) for _ in range(n)]


@pytest.fixture(scope='module')
def flat_folder(tmp_path_factory):
  """train: 3 classes x 12 flat images (ids 0..35); val: 3 x 4 (ids 0..11, red = id)."""
  root = tmp_path_factory.mktemp('flat')
  train = _write_flat_folder(root, 'train', 12)
  val = _write_flat_folder(root, 'val', 4)
  return root, train, val


@pytest.fixture(scope='module')
def textured_folder(tmp_path_factory):
  """One 64x48 random-noise image (train and val) for comparisons against PIL."""
  root = tmp_path_factory.mktemp('textured')
  rng = np.random.default_rng(0)
  pixels = rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)
  for split in ('train', 'val'):
    (root / split / 'only').mkdir(parents=True)
    Image.fromarray(pixels).save(root / split / 'only' / 'a.png')  # Lossless.
  return root, pixels


def test_train_batch_values_and_labels(flat_folder):
  root, files, _ = flat_folder
  it = ip.make_train_iterator(_data(_config(root)), process_index=0, process_count=1)
  for batch in _take(it, 2):
    image, label = batch['image'], batch['label']
    assert image.shape == (6, 8, 8, 3) and image.dtype == np.float32
    assert label.shape == (6,) and label.dtype == np.int32
    assert batch['data_skipped'] == 0
    for x, y, i in zip(image, label, _ids(image)):
      reference = np.asarray(Image.open(files[i]).convert('RGB'), np.float64)  # PIL decode.
      expected = (reference.mean(axis=(0, 1)) / 255 - MEAN) / STD
      np.testing.assert_allclose(x, np.broadcast_to(expected, x.shape), atol=1e-4)
      assert CLASSES[y] == files[i].parent.name  # Label id = index of the sorted class name.


def test_train_crop_and_resize_match_pil(textured_folder):
  root, pixels = textured_folder
  # The only crop of aspect 64/48 with area 1 is the whole image: the output is a plain resize.
  c = _config(root, image_size=16, crop_scale=(1.0, 1.0), crop_ratio=(64 / 48, 64 / 48))
  c.batch_size = 2
  image = next(ip.make_train_iterator(_data(c), process_index=0, process_count=1))['image'][0]
  reference = np.asarray(Image.fromarray(pixels).resize((16, 16), Image.BILINEAR), np.float64)
  reference = (reference / 255 - MEAN) / STD
  # PIL rounds its output to uint8 and uses fixed-point weights: within ~1.5 / 255.
  np.testing.assert_allclose(image, reference, atol=1.5 / 255 / STD.min())


def _torchvision_fallback(height, width, ratio):
  """Independent restatement of torchvision's RandomResizedCrop central fallback."""
  in_ratio = width / height
  if in_ratio < min(ratio):
    w, h = width, int(round(width / min(ratio)))
  elif in_ratio > max(ratio):
    h, w = height, int(round(height * max(ratio)))
  else:
    h, w = height, width
  return (height - h) // 2, (width - w) // 2, h, w


def test_random_resized_crop_window():
  windows = np.stack([
      tf_augment.random_resized_crop_window(300, 400, scale=(0.3, 1.0), ratio=(3 / 4, 4 / 3),
                                            seed=tf.constant([7, s], tf.int64)).numpy()
      for s in range(300)])
  top, left, h, w = windows.T
  assert (top >= 0).all() and (left >= 0).all()
  assert (top + h <= 300).all() and (left + w <= 400).all()
  area = h * w / (300 * 400)
  assert area.min() >= 0.3 - 0.01 and area.max() <= 1.0
  aspect = w / h
  assert aspect.min() >= 0.75 - 0.02 and aspect.max() <= 4 / 3 + 0.02
  # Accepted draws: area fraction ~ U(0.3, 1) conditioned on fitting, so mean well above 0.5.
  assert 0.5 < area.mean() < 0.75
  assert len({tuple(x) for x in windows}) > 250  # Seeds give different crops.
  # Nothing fits in a 100x10 image at scale 1: the central fallback, exactly.
  for height, width in ((100, 10), (10, 100), (30, 40)):
    window = tf_augment.random_resized_crop_window(
        height, width, scale=(1.0, 1.0), ratio=(0.9, 1.1),
        seed=tf.constant([0, 1], tf.int64)).numpy()
    assert tuple(window) == _torchvision_fallback(height, width, (0.9, 1.1))


def test_processes_read_disjoint_parts_covering_everything(flat_folder):
  root, files, _ = flat_folder
  c = _config(root)  # Global batch 6: 3 per process; 18 files per process = 6 steps an epoch.
  seen = []
  for process_index in (0, 1):
    it = ip.make_train_iterator(_data(c), process_index=process_index, process_count=2)
    ids = np.concatenate([_ids(b['image']) for b in _take(it, 12)])  # Two epochs.
    epoch0, epoch1 = ids[:18], ids[18:]
    assert sorted(epoch0) == sorted(set(epoch0)) == sorted(epoch1)  # Each file once per epoch.
    assert not np.array_equal(epoch0, epoch1)  # Reshuffled every epoch.
    seen.append(set(epoch0))
  assert not seen[0] & seen[1]
  assert seen[0] | seen[1] == set(files)


def test_determinism_and_seed(flat_folder, textured_folder):
  root, _, _ = flat_folder
  c = _config(root, flip=True)
  first = _take(ip.make_train_iterator(_data(c), process_index=0, process_count=1), 3)
  again = _take(ip.make_train_iterator(_data(c), process_index=0, process_count=1), 3)
  for a, b in zip(first, again):
    np.testing.assert_array_equal(a['image'], b['image'])
    np.testing.assert_array_equal(a['label'], b['label'])
  c.seed = 1
  other = _take(ip.make_train_iterator(_data(c), process_index=0, process_count=1), 3)
  assert not np.array_equal(_ids(np.concatenate([b['image'] for b in first])),
                            _ids(np.concatenate([b['image'] for b in other])))
  # Augmentations alone also follow the seed (one image: only the crops can differ).
  root, _ = textured_folder
  crops = []
  for seed in (0, 1):
    c = _config(root, image_size=16)
    c.seed = seed
    c.batch_size = 4
    crops.append(next(ip.make_train_iterator(_data(c), process_index=0, process_count=1))['image'])
  assert np.abs(crops[0] - crops[1]).max() > 0.1
  assert np.abs(crops[0][0] - crops[0][1]).max() > 0.1  # Each position its own crop.


def test_exact_resume_with_augmentations(flat_folder, textured_folder, tmp_path):
  # Flat images of the folder plus the noise image: crops, flips, jitter, grey, blur all matter.
  root, _, _ = flat_folder
  data = tmp_path / 'mixed'
  for split in ('train',):
    for cls in CLASSES:
      (data / split / cls).mkdir(parents=True)
      for f in (root / split / cls).iterdir():
        (data / split / cls / f.name).write_bytes(f.read_bytes())
  (data / 'train' / 'ant' / 'noise.png').write_bytes(
      (textured_folder[0] / 'train' / 'only' / 'a.png').read_bytes())
  c = _config(data, image_size=12, flip=True, color_jitter=0.5, grayscale=0.3, blur=0.5)
  # 37 files, process 1 of 2 holds 18; local batch 8: step 4 starts at position 32 (epoch 1,
  # offset 14) and step 6 crosses into epoch 2.
  c.batch_size = 16
  n, k = 4, 3
  full = _take(ip.make_train_iterator(_data(c), process_index=1, process_count=2), n + k)
  resumed = _take(
      ip.make_train_iterator(_data(c), start_step=n, process_index=1, process_count=2), k)
  for a, b in zip(full[n:], resumed):
    np.testing.assert_array_equal(a['image'], b['image'])
    np.testing.assert_array_equal(a['label'], b['label'])


def test_corrupt_images_skipped_counted_and_resumable(tmp_path):
  root = tmp_path / 'data'
  _write_flat_folder(root, 'train', 2)  # 6 good images, ids 0..5.
  (root / 'train' / 'bee' / 'garbage.jpg').write_bytes(b'not an image at all' * 9)
  good = (root / 'train' / 'cat' / '004.jpg').read_bytes()
  (root / 'train' / 'cat' / 'truncated.jpg').write_bytes(good[:len(good) // 3])
  c = _config(root)
  c.batch_size = 4  # 8 files, 2 of them bad: 2 steps per epoch.
  batches = _take(ip.make_train_iterator(_data(c), process_index=0, process_count=1), 6)
  assert [b['data_skipped'] for b in batches][1::2] == [2, 4, 6]  # Two per epoch, counted.
  for b in batches:
    assert b['image'].shape == (4, 8, 8, 3)
    ids = _ids(b['image'])
    assert set(ids) <= set(range(6))  # Bad slots hold copies of good images, never zeros.
    assert (np.abs(b['image'] - b['image'][:, :1, :1]).max() < 1e-4)  # All flat images.
  epoch = np.concatenate([_ids(b['image']) for b in batches[:2]])
  assert set(epoch) == set(range(6))  # Every good image still seen once per epoch.
  resumed = _take(
      ip.make_train_iterator(_data(c), start_step=3, process_index=0, process_count=1), 3)
  for a, b in zip(batches[3:], resumed):
    np.testing.assert_array_equal(a['image'], b['image'])
  # Evaluation marks them invalid (no padding here: 8 inputs, batch 4) and counts them.
  evals = list(ip.make_eval_iterator(_data(c), 'train', batch_size=4, process_index=0,
                                     process_count=1))
  assert sum(int(b['valid'].sum()) for b in evals) == 6 and evals[-1]['data_skipped'] == 2


def test_eval_pads_last_batch_and_covers_once(flat_folder):
  root, _, val = flat_folder
  c = _config(root)
  assert ip.num_examples(_data(c), 'val') == 12
  ids, labels = [], []
  for process_index in (0, 1):
    # 12 examples, 2 processes, local batch 4: 6 each -> 2 batches, the second half padding.
    batches = list(ip.make_eval_iterator(_data(c), 'val', batch_size=8, process_index=process_index,
                                         process_count=2))
    assert len(batches) == 2
    for b in batches:
      assert b['image'].shape == (4, 8, 8, 3) and b['valid'].dtype == bool
    valid = np.concatenate([b['valid'] for b in batches])
    np.testing.assert_array_equal(valid, [True] * 6 + [False] * 2)
    image = np.concatenate([b['image'] for b in batches])
    label = np.concatenate([b['label'] for b in batches])
    assert (label[~valid] == -1).all() and (image[~valid] == 0).all()
    ids.extend(_ids(image[valid]))
    labels.extend(label[valid])
  assert sorted(ids) == sorted(val)  # Every example exactly once over the processes.
  for i, y in zip(ids, labels):
    assert CLASSES[y] == val[i].parent.name
  # Uneven split: 12 examples over 5 processes of local batch 1 -> 3 steps on every process.
  counts = [len(list(ip.make_eval_iterator(_data(c), 'val', batch_size=5, process_index=p,
                                           process_count=5))) for p in (0, 4)]
  assert counts == [3, 3]
  subset = list(ip.make_eval_iterator(_data(c), 'val', batch_size=4, process_index=0,
                                      process_count=1,
                                      num_examples=5))
  assert sum(b['valid'].sum() for b in subset) == 5


def test_eval_resize_and_centre_crop_match_pil(textured_folder):
  root, pixels = textured_folder
  c = _config(root, image_size=16)
  assert ip.eval_resize_size(_data(c)) == 18  # round(256 * 16 / 224)
  b = next(ip.make_eval_iterator(_data(c), 'val', batch_size=1, process_index=0, process_count=1))
  resized = Image.fromarray(pixels).resize((24, 18), Image.BILINEAR)  # Short side 48 -> 18.
  reference = np.asarray(resized, np.float64)[1:17, 4:20]  # Centre 16x16.
  reference = (reference / 255 - MEAN) / STD
  np.testing.assert_allclose(b['image'][0], reference, atol=1.5 / 255 / STD.min())


def test_to_global_array():
  c = config_lib.default_config()
  c.data.loader = 'tf'
  c.data.dataset = 'synthetic'
  c.data.image_size = 4
  c.batch_size = 16
  batch = next(ip.make_train_iterator(_data(c)))
  mesh = jax.sharding.Mesh(np.array(jax.devices()), ('data',))
  sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec('data'))
  out = ip.to_global_array(batch, sharding)
  assert isinstance(out['image'], jax.Array) and out['image'].shape == (16, 4, 4, 3)
  assert out['label'].shape == (16,) and out['label'].dtype == np.int32
  assert out['image'].sharding == sharding
  assert len(out['image'].addressable_shards) == 8
  assert out['image'].addressable_shards[3].data.shape == (2, 4, 4, 3)
  np.testing.assert_array_equal(np.asarray(out['image']), batch['image'])
  assert out['data_skipped'] == 0


def test_synthetic():
  c = config_lib.default_config()
  c.data.loader = 'tf'
  c.data.dataset = 'synthetic'
  c.data.image_size = 8
  c.data.num_classes = 5
  c.batch_size = 4
  a = _take(ip.make_train_iterator(_data(c), process_index=0, process_count=2), 3)
  b = _take(ip.make_train_iterator(_data(c), process_index=1, process_count=2), 3)
  r = _take(ip.make_train_iterator(_data(c), start_step=2, process_index=0, process_count=2), 1)
  np.testing.assert_array_equal(a[2]['image'], r[0]['image'])
  assert not np.array_equal(a[0]['image'], b[0]['image'])
  labels = np.concatenate([x['label'] for x in a + b])
  assert labels.min() >= 0 and labels.max() < 5
  lo, hi = (0 - MEAN) / STD, (1 - MEAN) / STD
  image = a[0]['image']
  assert (image >= lo - 1e-5).all() and (image <= hi + 1e-5).all()
  assert ip.num_examples(_data(c), 'validation') == sources.SYNTHETIC_EVAL_EXAMPLES
  # The eval pipeline reads synthetic images too (the in-training kNN uses it in smoke tests).
  ev = list(ip.make_eval_iterator(_data(c), 'validation', batch_size=4, num_examples=6,
                                  process_index=0, process_count=1))
  assert [int(e['valid'].sum()) for e in ev] == [4, 2]
  assert ev[0]['image'].shape == (4, 8, 8, 3) and np.isfinite(ev[0]['image']).all()


def test_tfds_mock(monkeypatch):
  monkeypatch.setattr(tf_loader, 'TFDS_READ_CHUNKS', 4)
  c = config_lib.default_config()
  c.data.loader = 'tf'
  c.data.dataset = 'cifar10'
  c.data.data_dir = '/nonexistent/tfds'
  c.data.image_size = 8
  c.data.shuffle_buffer = 8
  c.batch_size = 4
  with tfds.testing.mock_data(num_examples=5):
    full = _take(ip.make_train_iterator(_data(c), process_index=0, process_count=1), 5)
    resumed = _take(ip.make_train_iterator(_data(c), start_step=3, process_index=0,
                                           process_count=1), 2)
    evals = list(ip.make_eval_iterator(_data(c), 'test', batch_size=4, process_index=0,
                                       process_count=1))
  lo, hi = (0 - MEAN) / STD, (1 - MEAN) / STD
  for b in full:
    assert b['image'].shape == (4, 8, 8, 3) and b['image'].dtype == np.float32
    assert (b['image'] >= lo - 1e-5).all() and (b['image'] <= hi + 1e-5).all()
    assert b['image'].std() > 0.1  # Mocked images are noise.
    assert ((b['label'] >= 0) & (b['label'] < 10)).all()
  for a, b in zip(full[3:], resumed):
    np.testing.assert_array_equal(a['image'], b['image'])
  assert [int(b['valid'].sum()) for b in evals] == [4, 1]  # 5 mocked examples, padded.


class CjepaTestFlat(tfds.core.GeneratorBasedBuilder):
  """A real (not mocked) tfds dataset of flat images: red = 5 + 3 * id, label = id % 3."""

  VERSION = tfds.core.Version('1.0.0')

  def _info(self):
    return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
        'image': tfds.features.Image(shape=(None, None, 3)),
        'label': tfds.features.ClassLabel(num_classes=3)}))

  def _split_generators(self, dl_manager):
    del dl_manager
    return {'train': self._generate_examples(40), 'test': self._generate_examples(11)}

  def _generate_examples(self, n):
    for i in range(n):
      image = np.zeros((30 + i % 5, 40, 3), np.uint8)
      image[..., 0] = 5 + 3 * i
      yield i, {'image': image, 'label': i % 3}


def test_tfds_real_builder(tmp_path, monkeypatch):
  """Process parts, epochs and resumption through real tfds splits (the mock ignores splits)."""
  CjepaTestFlat(data_dir=str(tmp_path)).download_and_prepare(
      file_format='tfrecord', download_config=tfds.download.DownloadConfig(num_shards=None))
  monkeypatch.setattr(tf_loader, 'TFDS_READ_CHUNKS', 4)
  c = config_lib.default_config()
  c.data.loader = 'tf'
  c.data.update(dataset='cjepa_test_flat', data_dir=str(tmp_path), image_size=8,
                shuffle_buffer=4)
  c.batch_size = 10  # 20 examples per process, local batch 5: 4 steps per epoch.
  seen = []
  for process_index in (0, 1):
    batches = _take(
        ip.make_train_iterator(_data(c), process_index=process_index, process_count=2), 8)
    red = np.concatenate([b['image'][..., 0].mean(axis=(1, 2)) for b in batches])
    ids = np.round(((red * STD[0] + MEAN[0]) * 255 - 5) / 3).astype(int)
    np.testing.assert_array_equal(np.concatenate([b['label'] for b in batches]), ids % 3)
    assert sorted(ids[:20]) == sorted(set(ids[:20])) == sorted(ids[20:])
    assert not np.array_equal(ids[:20], ids[20:])
    seen.append(set(ids[:20]))
  assert not seen[0] & seen[1] and seen[0] | seen[1] == set(range(40))
  resumed = _take(
      ip.make_train_iterator(_data(c), start_step=5, process_index=1, process_count=2), 3)
  for a, b in zip(batches[5:], resumed):
    np.testing.assert_array_equal(a['image'], b['image'])
  assert ip.num_examples(_data(c), 'test') == 11
  evals = list(ip.make_eval_iterator(_data(c), 'test', batch_size=8, process_index=1,
                                     process_count=2))
  assert [int(b['valid'].sum()) for b in evals] == [4, 1]  # 5 of 11 on process 1, padded.


def test_clear_errors(flat_folder, tmp_path):
  root, _, _ = flat_folder
  with pytest.raises(ValueError, match='needs config.data.data_dir'):
    ip.make_train_iterator(_data(_config('')))
  with pytest.raises(ValueError, match='<split>/<class name>'):
    ip.make_train_iterator(_data(_config(root, train_split='nope')))
  with pytest.raises(ValueError, match='No images'):
    (tmp_path / 'empty' / 'train' / 'x').mkdir(parents=True)
    ip.make_train_iterator(_data(_config(tmp_path / 'empty')))
  with pytest.raises(ValueError, match='multiple of the number of processes'):
    ip.make_train_iterator(_data(_config(root)), process_index=0, process_count=4)
  with pytest.raises(ValueError, match='Unknown dataset'):
    ip.make_train_iterator(_data(_config(root, dataset='no_such_dataset_xyz')))
  with pytest.raises(ValueError, match='tfds build imagenet2012'):
    ip.make_train_iterator(_data(_config(tmp_path, dataset='cifar10')))
  with pytest.raises(ValueError, match='tfds build imagenet2012'):
    ip.check_dataset(_data(_config(tmp_path, dataset='imagenet2012')))
  with pytest.raises(ValueError, match='<split>/<class name>'):
    ip.check_dataset(_data(_config(root, train_split='validation')))
  ip.check_dataset(_data(_config(root)))  # Fine as configured.
  with pytest.raises(ValueError, match='crop_scale'):
    ip.make_train_iterator(_data(_config(root, crop_scale=(0.5, 0.2))))
  with pytest.raises(ValueError, match='eval_resize'):
    ip.eval_resize_size(_data(_config(root, eval_resize=200)))


def _write_classes(root: pathlib.Path, split: str, classes) -> None:
  """One tiny JPEG per class: root/split/<class>/0.jpg."""
  for cls in classes:
    (root / split / cls).mkdir(parents=True)
    Image.new('RGB', (8, 8), (10, 20, 30)).save(root / split / cls / '0.jpg')


def test_label_splits_of_image_folders(flat_folder, tmp_path):
  root, _, _ = flat_folder
  c = _config(root, num_classes=3)
  # The names in label order: the order the pipeline numbers the sorted class folders in.
  assert ip.class_names(_data(c), 'train') == ip.class_names(_data(c), 'val') == list(CLASSES)
  assert ip.check_label_splits(_data(c)) == list(CLASSES)
  with pytest.raises(ValueError, match=r'has 3 classes but config\.data\.num_classes=1000; set '
                                       r'config\.data\.num_classes=3'):
    ip.check_label_splits(_data(_config(root)))

  _write_classes(tmp_path / 'one', 'train', ['ant'])
  _write_classes(tmp_path / 'one', 'val', ['ant'])
  with pytest.raises(ValueError, match=r"train has 1 class\(es\) \('ant'\).*at least 2"):
    ip.check_label_splits(_data(_config(tmp_path / 'one', num_classes=1)))

  _write_classes(tmp_path / 'renamed', 'train', ['ant', 'bee', 'cat'])
  _write_classes(tmp_path / 'renamed', 'val', ['ant', 'bee', 'cow'])
  train_dir, val_dir = tmp_path / 'renamed' / 'train', tmp_path / 'renamed' / 'val'
  with pytest.raises(ValueError) as e:
    ip.check_label_splits(_data(_config(tmp_path / 'renamed', num_classes=3)))
  message = str(e.value)
  assert '\n' not in message
  assert f"{train_dir} has class 'cat' that {val_dir} lacks" in message
  assert f"{val_dir} has class 'cow' that {train_dir} lacks" in message

  _write_classes(tmp_path / 'fewer', 'train', ['ant', 'bee', 'cat'])
  _write_classes(tmp_path / 'fewer', 'val', ['ant', 'cat'])
  with pytest.raises(ValueError, match="has class 'bee' that .* lacks"):
    ip.check_label_splits(_data(_config(tmp_path / 'fewer', num_classes=3)))


def test_label_splits_of_synthetic_and_tfds():
  c = config_lib.default_config()
  c.data.loader = 'tf'
  c.data.update(dataset='synthetic', num_classes=4, eval_split='validation')
  assert ip.check_label_splits(_data(c)) == ['class_0', 'class_1', 'class_2', 'class_3']
  c.data.num_classes = 1
  with pytest.raises(ValueError, match='set config.data.num_classes >= 2'):
    ip.check_label_splits(_data(c))
  # tfds: the names come from the builder's metadata (nothing needs to be prepared).
  c.data.update(dataset='cifar10', data_dir='/nonexistent/tfds', num_classes=10,
                eval_split='test')
  # Names ('0'.. until prepared): one list per split.
  assert len(ip.check_label_splits(_data(c))) == 10
  c.data.num_classes = 100
  with pytest.raises(ValueError, match="split 'train' of tfds dataset 'cifar10' has 10 classes"):
    ip.check_label_splits(_data(c))


def test_shared_cifar10(shared_cifar10_tarballs, tmp_path):
  """Real photographs: the first 20 test images of each class (a full unpack is 10k files)."""
  with tarfile.open(shared_cifar10_tarballs / 'test.tar.gz') as tar:
    members = [m for m in tar
               if m.isdir() or (m.name.endswith('.jpg') and int(m.name[-8:-4]) < 20)]
    tar.extractall(tmp_path, members=members, filter='data')
  c = _config(tmp_path, train_split='test', image_size=32)
  c.batch_size = 32
  assert ip.num_examples(_data(c), 'test') == 200
  batch = next(ip.make_train_iterator(_data(c), process_index=0, process_count=1))
  assert batch['image'].shape == (32, 32, 32, 3) and batch['data_skipped'] == 0
  assert batch['image'].std() > 0.5  # Real photographs, normalised.
  evals = list(ip.make_eval_iterator(_data(c), 'test', batch_size=100, process_index=0,
                                     process_count=1))
  labels = np.concatenate([b['label'] for b in evals])
  assert all(b['valid'].all() for b in evals)
  # Ten class folders in sorted order ('airplane' = 0, ..., 'truck' = 9), 20 images each.
  np.testing.assert_array_equal(labels, np.repeat(np.arange(10), 20))
  classes = sorted(p.name for p in (tmp_path / 'test').iterdir())
  assert classes[0] == 'airplane' and classes[-1] == 'truck' and len(classes) == 10
