"""The probes: linear / kNN against float64 numpy references, holdout-only selection, and the
end-to-end restore -> features -> probes -> JSON run on a tiny image folder."""

import importlib.util
import json
import pathlib

import jax
import numpy as np
import pytest
from jax.sharding import Mesh
from PIL import Image

from cjepa_jax import config as config_lib
from cjepa_jax import sharding
from cjepa_jax.data import image_folder as image_folder_lib
from cjepa_jax.data.spec import DataSpec
from cjepa_jax.evals import base
from cjepa_jax.evals import features as features_lib
from cjepa_jax.evals import knn as knn_lib
from cjepa_jax.evals import linear as linear_lib
from cjepa_jax.evals import registry
from cjepa_jax.evals import runner
from cjepa_jax.evals import units
from cjepa_jax.models import jepa
import pretrained_utils

ROOT = pathlib.Path(__file__).resolve().parents[1]
CLASSES = ('apple', 'grass', 'sky')           # Sorted: labels 0, 1, 2.
COLOURS = ((200, 40, 40), (40, 180, 40), (50, 80, 220))
PER_CLASS = 20


def monitors(config, mesh, model):
  """The trainer's monitors of `config`, made from its specs as the trainers make them."""
  return registry.monitors(base.EvalsSpec.from_config(config), DataSpec.from_config(config), mesh,
                           model)


def mesh8():
  return Mesh(np.asarray(jax.devices()).reshape(8, 1), sharding.MESH_AXES)


def clusters(rng, n, num_classes, dim, spread):
  """Gaussian clusters around random centres `spread` apart: (features [n, dim], labels [n])."""
  centres = rng.normal(size=(num_classes, dim)) * spread
  y = rng.integers(0, num_classes, size=n).astype(np.int32)
  return (centres[y] + rng.normal(size=(n, dim))).astype(np.float32), y


# ------------------------------------------------------------------------------------------------
# kNN.
# ------------------------------------------------------------------------------------------------


def knn_numpy(train, train_y, test, num_classes, k, temperature):
  """Independent float64 reference of DINO's weighted kNN vote: scores [M, C]."""
  a = train.astype(np.float64)
  a /= np.linalg.norm(a, axis=1, keepdims=True)
  b = test.astype(np.float64)
  b /= np.linalg.norm(b, axis=1, keepdims=True)
  sims = b @ a.T
  scores = np.zeros((len(test), num_classes))
  for i, row in enumerate(sims):
    nearest = np.argsort(-row, kind='stable')[:k]
    for j in nearest:
      scores[i, train_y[j]] += np.exp(row[j] / temperature)
  return scores


@pytest.mark.parametrize('n_train', [100, 203])
def test_knn_matches_numpy_reference_sharded(n_train):
  """8 devices: 100 rows leave fewer than k per device, 203 need padding; same votes as numpy."""
  rng = np.random.default_rng(n_train)
  train = rng.normal(size=(n_train, 12)).astype(np.float32)
  train_y = rng.integers(0, 5, size=n_train).astype(np.int32)
  test = rng.normal(size=(300, 12)).astype(np.float32)  # > one query chunk of 256.
  want = knn_numpy(train, train_y, test, 5, 20, 0.07)
  got = knn_lib.knn_scores(train, train_y, test, num_classes=5, k=20, temperature=0.07,
                           mesh=mesh8())
  np.testing.assert_allclose(got, want, rtol=2e-4)
  np.testing.assert_array_equal(np.argmax(got, 1), np.argmax(want, 1))
  test_y = rng.integers(0, 5, size=300)
  result = knn_lib.knn_probe(train, train_y, test, test_y, num_classes=5, k=20, temperature=0.07)
  assert result['top1'] == np.mean(np.argmax(want, 1) == test_y)
  top5 = np.argsort(-want, axis=1)[:, :5]
  assert result['top5'] == np.mean(np.any(top5 == test_y[:, None], axis=1)) == 1.0  # C = 5.
  assert (result['k'], result['temperature']) == (20, 0.07)


def test_knn_separates_clusters():
  rng = np.random.default_rng(1)
  train, train_y = clusters(rng, 400, 6, 32, spread=4.0)
  test, test_y = clusters(np.random.default_rng(1), 400, 6, 32, spread=4.0)  # Same centres.
  result = knn_lib.knn_probe(train, train_y, test[:200], test_y[:200], num_classes=6)
  assert result['top1'] >= 0.98
  assert result['top5'] == 1.0


# ------------------------------------------------------------------------------------------------
# Linear probe.
# ------------------------------------------------------------------------------------------------


def train_linear_numpy(x, y, mean, std, num_classes, lr, wd, steps):
  """Full-batch Adam (b1 0.9, b2 0.999, eps 1e-8), cosine-decayed lr, L2 wd on the kernel."""
  x = (x.astype(np.float64) - mean) / std
  w = np.zeros((x.shape[1], num_classes))
  b = np.zeros(num_classes)
  m = [np.zeros_like(w), np.zeros_like(b)]
  v = [np.zeros_like(w), np.zeros_like(b)]
  onehot = np.eye(num_classes)[y]
  for t in range(steps):
    logits = x @ w + b
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    d = (p - onehot) / len(x)
    grads = [x.T @ d + wd * w, d.sum(0)]
    lr_t = lr * 0.5 * (1 + np.cos(np.pi * t / steps))
    for i, g in enumerate(grads):
      m[i] = 0.9 * m[i] + 0.1 * g
      v[i] = 0.999 * v[i] + 0.001 * g * g
      mhat = m[i] / (1 - 0.9 ** (t + 1))
      vhat = v[i] / (1 - 0.999 ** (t + 1))
      step = lr_t * mhat / (np.sqrt(vhat) + 1e-8)
      if i == 0:
        w = w - step
      else:
        b = b - step
  return w, b


def test_train_linear_matches_numpy_adam_per_grid_point():
  """The vmapped sweep trains each (lr, wd) exactly as a float64 full-batch Adam reference."""
  rng = np.random.default_rng(2)
  x, y = clusters(rng, 64, 3, 8, spread=1.0)
  idx = np.arange(64)
  mean, std = linear_lib.feature_stats(x, idx)
  np.testing.assert_allclose(mean, x.astype(np.float64).mean(0), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(std, x.astype(np.float64).std(0), rtol=1e-5)
  grid = [(0.05, 0.0), (0.02, 0.1)]
  params = linear_lib.train_linear(x, y, idx, mean, std, num_classes=3,
                                   lrs=[g[0] for g in grid], wds=[g[1] for g in grid], epochs=8,
                                   batch_size=0, seed=0, mesh=mesh8())
  for g, (lr, wd) in enumerate(grid):
    w, b = train_linear_numpy(x, y, mean, std, 3, lr, wd, steps=8)
    np.testing.assert_allclose(np.asarray(params['kernel'][g]), w, rtol=1e-3, atol=1e-5)
    np.testing.assert_allclose(np.asarray(params['bias'][g]), b, rtol=1e-3, atol=1e-5)


LINEAR = dict(num_classes=5, lrs=(1e-3, 3e-2), wds=(0.0, 1e-2), epochs=15, batch_size=64,
              holdout_fraction=0.2, seed=0)


def test_linear_probe_separates_and_chooses_on_holdout_only():
  rng = np.random.default_rng(3)
  x, y = clusters(rng, 500, 5, 16, spread=3.0)
  train_x, train_y, test_x, test_y = x[:400], y[:400], x[400:], y[400:]
  result = linear_lib.linear_probe(train_x, train_y, test_x, test_y, mesh=mesh8(), **LINEAR)
  assert result['top1'] >= 0.98 and result['top5'] == 1.0
  assert result['retrained'] and result['dim'] == 16
  assert len(result['sweep']) == 4
  best = max(result['sweep'], key=lambda s: (s['holdout_top1'], -s['holdout_loss']))
  assert (result['best_lr'], result['best_wd']) == (best['lr'], best['wd'])
  assert result['holdout_top1'] == best['holdout_top1']
  assert result['holdout_n'] == 80  # 20 % of the 400 training rows, recorded for the holdout's SE.

  # Garbage test split (noise features, permuted labels): same choice, same sweep numbers.
  garbage_x = rng.normal(size=test_x.shape).astype(np.float32) * 10
  garbage_y = rng.permutation(test_y)
  other = linear_lib.linear_probe(train_x, train_y, garbage_x, garbage_y, mesh=mesh8(), **LINEAR)
  assert (other['best_lr'], other['best_wd']) == (result['best_lr'], result['best_wd'])
  assert other['sweep'] == result['sweep']
  assert other['top1'] < 0.5


def test_linear_probe_rejects_a_sweep_without_holdout():
  x = np.zeros((10, 4), np.float32)
  y = np.zeros(10, np.int32)
  with pytest.raises(ValueError, match='holdout_fraction > 0'):
    linear_lib.linear_probe(x, y, x, y, **dict(LINEAR, holdout_fraction=0.0))
  with pytest.raises(ValueError, match='num_classes'):
    linear_lib.linear_probe(x, y + 7, x, y, **LINEAR)


# ------------------------------------------------------------------------------------------------
# End to end: a checkpoint from a short training run, an image folder, the JSON.
# ------------------------------------------------------------------------------------------------


def pretrain_config():
  c = config_lib.default_config()
  c.batch_size = 8
  c.total_steps = 2
  c.data.dataset = 'synthetic'
  c.data.image_size = 32
  c.data.num_train_examples = 64
  c.data.num_classes = 3
  c.data.eval_resize = 224
  c.model.variant = 'Ti/4'
  c.model.depth = 1
  c.model.dtype = 'float32'
  c.model.pred_width = 48
  c.model.pred_depth = 1
  c.mask.min_keep = 4
  c.optim.warmup_steps = 1
  c.evals.knn.train_examples = 48
  c.evals.knn.eval_examples = 24
  return c


@pytest.fixture(scope='module')
def pretrained(tmp_path_factory):
  """A workdir with a tiny I-JEPA train state's checkpoint (as the trainer saves it), the state.

  The state is the trainer's own `init_state` with the context encoder moved away from the EMA
  target (as training does), so restoring the wrong one of the two is caught. (Running real train
  steps would only add a ~10 s compile to this file.)
  """
  workdir = tmp_path_factory.mktemp('pretrain')
  config = pretrain_config()
  rng = np.random.default_rng(0)

  def move(state):
    state['params']['encoder'] = jax.tree.map(
        lambda p: (p + 0.01 * rng.normal(size=p.shape)).astype(p.dtype),
        state['params']['encoder'])
    return state

  state = pretrained_utils.save_pretraining_checkpoint(workdir, config, 2, move)
  models = jepa.build_models(jepa.ModelSpec.from_config(config))
  return workdir, state, config, models


@pytest.fixture(scope='module')
def image_folder(tmp_path_factory):
  """data/{train,test}/<class>/*.png: 3 colour-coded classes, 20 noisy 32x32 images each."""
  root = tmp_path_factory.mktemp('folder')
  rng = np.random.default_rng(0)
  for split in ('train', 'test'):
    for name, colour in zip(CLASSES, COLOURS):
      (root / split / name).mkdir(parents=True)
      for i in range(PER_CLASS):
        pixels = np.clip(np.asarray(colour) + rng.normal(0, 40, size=(32, 32, 3)), 0, 255)
        Image.fromarray(pixels.astype(np.uint8)).save(root / split / name / f'{i:03d}.png')
  return root


def probe_config(pretrained_path, data_dir):
  spec = importlib.util.spec_from_file_location('probe_linear', ROOT / 'configs/probe_linear.py')
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  c = module.get_config('cifar10')
  c.pretrained = str(pretrained_path)
  c.probes = 'linear,knn'  # The others: tests/test_evals.py.
  c.data.data_dir = str(data_dir)
  c.data.num_classes = 3
  c.batch_size = 16
  c.evals.linear.epochs = 10
  c.evals.linear.batch_size = 32
  c.evals.linear.lrs = (1e-2,)
  c.evals.linear.wds = (0.0, 1e-3)
  c.evals.knn.k = 5
  c.model.depth = 1
  return c


def test_probe_restores_the_checkpoint_and_writes_results(pretrained, image_folder, tmp_path):
  workdir, state, _, _ = pretrained
  config = probe_config(workdir, image_folder)
  mesh = sharding.make_mesh(sharding.MeshSpec.from_config(config))
  for name, want in (('target', state['target_params']),
                     ('context', state['params']['encoder'])):
    config.encoder = name
    encoder, params, info = features_lib.restore_encoder(
        features_lib.EncoderSource.from_config(config), mesh)
    assert info['step'] == 2 and info['image_size'] == 32 and encoder.num_layers == 1
    assert jax.tree.structure(params) == jax.tree.structure(want)
    for got, ref in zip(jax.tree.leaves(params), jax.tree.leaves(want)):
      np.testing.assert_array_equal(np.asarray(got), ref)
      assert got.sharding.is_fully_replicated
  # The EMA target and the context encoder differ: the key choice matters.
  assert not np.allclose(state['target_params']['blocks_0']['mlp']['fc1']['kernel'],
                         state['params']['encoder']['blocks_0']['mlp']['fc1']['kernel'])

  config.encoder = 'target'
  out = tmp_path / 'probe'
  results = runner.run(config, str(out))
  saved = json.loads((out / runner.RESULTS_FILE).read_text())
  assert saved == json.loads(json.dumps(results))
  assert saved['checkpoint'] == str(workdir / 'checkpoints' / '2') and saved['step'] == 2
  assert saved['num_train'] == saved['num_test'] == 3 * PER_CLASS
  lin, knn = saved['linear'], saved['knn']
  assert set(lin['per_features']) == {'last', 'last4'} and lin['features'] in ('last', 'last4')
  assert lin['best_lr'] == 1e-2 and lin['best_wd'] in (0.0, 1e-3)
  assert (knn['k'], knn['temperature'], knn['features']) == (5, 0.07, lin['features'])
  # Colour-coded classes: any encoder's pooled features separate them (accuracies in %).
  assert saved['unit'] == 'percent' and 'accuracy_units' not in saved
  assert lin['top1'] >= 90 and knn['top1'] >= 90
  assert lin['top5'] == knn['top5'] == 100.0  # 3 classes.
  assert all(0 <= s['holdout_top1'] <= 100 for s in lin['sweep'])


def test_last4_of_one_block_is_the_normed_output(pretrained):
  """With depth 1, 'last4' re-applies the final LayerNorm to the only block: equals 'last'."""
  _, state, config, models = pretrained
  encoder = jepa.encoder_from_model_config(config.model)
  images = np.random.default_rng(5).normal(size=(4, 32, 32, 3)).astype(np.float32)
  feats = jax.jit(lambda p, x: features_lib.pooled_features(encoder, p, x, ('last', 'last4')))(
      state['target_params'], images)
  tokens = jax.jit(models.encoder.apply)({'params': state['target_params']}, images)
  np.testing.assert_allclose(feats['last'], np.asarray(tokens, np.float64).mean(1), atol=1e-5)
  np.testing.assert_allclose(feats['last4'], feats['last'], atol=1e-5)


def test_random_baseline_runs(image_folder, tmp_path):
  config = probe_config('random', image_folder)
  config.features = 'last'
  results = runner.run(config, str(tmp_path))
  saved = json.loads((tmp_path / runner.RESULTS_FILE).read_text())
  assert saved['checkpoint'] == 'random' and saved['step'] is None
  assert saved['model']['variant'] == 'Ti/4' and saved['model']['depth'] == 1
  assert set(saved['linear']['per_features']) == {'last'}
  assert results['unit'] == 'percent' and 0.0 <= results['linear']['top1'] <= 100.0


def test_knn_evaluator_for_the_trainer(pretrained, image_folder):
  """The periodic kNN: compiled once, and equal to the numpy vote on the same features."""
  _, state, config, models = pretrained
  config = config.copy_and_resolve_references()
  config.data.dataset = 'image_folder'
  config.data.data_dir = str(image_folder)
  config.data.eval_split = 'test'
  mesh = sharding.make_mesh(sharding.MeshSpec.from_config(config))
  params = jax.device_put(state['target_params'], sharding.replicated(mesh))
  config.evals.knn.every_steps = 1
  [monitor] = monitors(config, mesh, models.encoder)
  first, second = monitor.evaluate(params), monitor.evaluate(params)
  assert first == second and set(first) == {'knn_top1', 'knn_top5', 'unit'}
  feature_fn = monitor.features.feature_fn(('last',))
  assert feature_fn._cache_size() == 1  # pylint: disable=protected-access

  extract = features_lib.extract_features
  data = DataSpec.from_config(config)
  train_f, train_y = extract(feature_fn, params, data, 'train', mesh=mesh,
                             batch_size=8, num_examples=48)
  test_f, test_y = extract(feature_fn, params, data, 'test', mesh=mesh,
                           batch_size=8, num_examples=24)
  assert train_f['last'].shape == (48, 192) and test_f['last'].shape == (24, 192)
  want = knn_numpy(train_f['last'], train_y, test_f['last'], 3, 20, 0.07)
  assert first['knn_top1'] == units.percent(np.mean(np.argmax(want, 1) == test_y))



def test_in_training_is_the_knn_monitor_every_knn_every_steps(image_folder):
  """What the trainer runs: nothing by default, else the kNN monitor with its period."""
  config = pretrain_config()
  config.data.update(dataset='image_folder', data_dir=str(image_folder), eval_split='test')
  mesh = sharding.make_mesh(sharding.MeshSpec.from_config(config))
  encoder = jepa.encoder_from_model_config(config.model)
  assert monitors(config, mesh, encoder) == []
  config.evals.knn.every_steps = 5
  [monitor] = monitors(config, mesh, encoder)
  assert (monitor.name, monitor.every_steps) == ('knn', 5) and callable(monitor.evaluate)
  assert monitor.features is not None  # Its own features, of its own subsets.


def test_in_training_monitors_log_percent(monkeypatch):
  """The trainer's monitors return fractions from knn.py / fewshot.py; they are logged in %."""
  del monkeypatch
  config = pretrain_config()
  config.evals.knn.every_steps, config.evals.fewshot.every_steps = 5, 10
  fractions = {'knn': {'last': {'top1': 0.5472, 'top5': 0.9401}},
               'fewshot': {'last': {'top1': {1: 0.14506666666666665, 10: 1.0}}}}
  got = {name: (every, registry.type_of(name, config.evals[name]).logged(fractions[name]))
         for name, every in base.EvalsSpec.from_config(config).periods().items()}
  assert got == {
      'knn': (5, {'knn_top1': 54.72, 'knn_top5': 94.01, 'unit': 'percent'}),
      'fewshot': (10, {'fewshot_1shot': 14.5066666667, 'fewshot_10shot': 100.0,
                       'unit': 'percent'})}

def write_classes(root, split, classes):
  """One tiny PNG per class: root/split/<class>/0.png."""
  for name in classes:
    (root / split / name).mkdir(parents=True)
    Image.new('RGB', (8, 8), (90, 90, 90)).save(root / split / name / '0.png')


def test_probe_refuses_mismatched_class_folders_before_restoring(tmp_path):
  """Label id 2 would be 'sky' in train and 'snow' in test: refused, naming both, at once."""
  write_classes(tmp_path / 'data', 'train', CLASSES)
  write_classes(tmp_path / 'data', 'test', ('apple', 'grass', 'snow'))
  # No checkpoint there: had the probe restored first, the error would be 'No complete checkpoint'.
  config = probe_config(tmp_path / 'nothing_here', tmp_path / 'data')
  train_dir, test_dir = tmp_path / 'data' / 'train', tmp_path / 'data' / 'test'
  with pytest.raises(ValueError) as e:
    runner.run(config, str(tmp_path / 'out'))
  message = str(e.value)
  assert f"{train_dir} has class 'sky' that {test_dir} lacks" in message, message
  assert f"{test_dir} has class 'snow' that {train_dir} lacks" in message and '\n' not in message
  assert not (tmp_path / 'out').exists()


def test_probe_refuses_one_class_and_a_wrong_num_classes(image_folder, tmp_path):
  write_classes(tmp_path / 'data', 'train', ('apple',))
  write_classes(tmp_path / 'data', 'test', ('apple',))
  config = probe_config('random', tmp_path / 'data')
  config.data.num_classes = 1
  with pytest.raises(ValueError, match=r'has 1 class\(es\).*needs at least 2'):
    runner.run(config, str(tmp_path / 'out'))
  config = probe_config('random', image_folder)
  config.data.num_classes = 10
  with pytest.raises(ValueError, match=r'has 3 classes but config\.data\.num_classes=10'):
    runner.run(config, str(tmp_path / 'out'))


def test_knn_evaluator_checks_the_splits_when_made(tmp_path):
  """The trainer's monitor fails when it is built, not at its first evaluation hours later."""
  write_classes(tmp_path / 'data', 'train', ('apple',))
  write_classes(tmp_path / 'data', 'test', CLASSES)
  config = pretrain_config()
  config.data.update(dataset='image_folder', data_dir=str(tmp_path / 'data'), eval_split='test')
  mesh = sharding.make_mesh(sharding.MeshSpec.from_config(config))
  encoder = jepa.encoder_from_model_config(config.model)
  config.evals.knn.every_steps = 5
  with pytest.raises(ValueError, match=r'train has 1 class\(es\)'):
    monitors(config, mesh, encoder)
  write_classes(tmp_path / 'data', 'train', CLASSES[1:])  # Now the same 3 classes as 'test'.
  # pylint: disable-next=protected-access
  image_folder_lib.list_classes.cache_clear()  # Listings are cached per process.
  assert callable(monitors(config, mesh, encoder)[0].evaluate)


def test_bad_config_values_are_named(image_folder, tmp_path):
  config = probe_config('', image_folder)
  with pytest.raises(ValueError, match='--config.pretrained'):
    runner.run(config, str(tmp_path))
  config = probe_config('random', image_folder)
  config.features = 'last5'
  with pytest.raises(ValueError, match='config.features'):
    runner.run(config, str(tmp_path))
  config = probe_config(tmp_path / 'nothing_here', image_folder)
  with pytest.raises(ValueError, match='No complete checkpoint'):
    runner.run(config, str(tmp_path))


# ------------------------------------------------------------------------------------------------
# The registry: one interface, one feature extraction per run.
# ------------------------------------------------------------------------------------------------


def test_unknown_evaluator_is_one_line_naming_the_known(image_folder):
  config = probe_config('random', image_folder)
  mesh = sharding.make_mesh(sharding.MeshSpec.from_config(config))
  encoder = jepa.encoder_from_model_config(config.model)
  assert registry.names() == ('attentive', 'classify', 'fewshot', 'knn', 'linear', 'lowshot')
  known = 'known: attentive, classify, fewshot, knn, linear, lowshot'
  with pytest.raises(ValueError, match=rf"^Unknown evaluator 'svm' in config.evals; {known}\.$"):
    registry.build('svm', base.EvalsSpec.from_config(config), DataSpec.from_config(config), mesh,
                   encoder)
  known = 'known: attentive, fewshot, knn, linear, lowshot'   # The probe config's entries.
  config.probes = 'linear,svm'
  with pytest.raises(ValueError, match=rf"^Unknown evaluator\(s\) 'svm' in config.evals; {known}"):
    runner.check_config(config)


def test_evaluators_share_one_extraction_per_split(image_folder, monkeypatch):
  """kNN and linear built on one FeatureCache: each split is extracted once, for one params."""
  calls = []
  rng = np.random.default_rng(7)
  x, y = clusters(rng, 40, 3, 8, spread=4.0)

  def fake_extract(feature_fn, params, config, split, **kwargs):
    del feature_fn, config, kwargs
    calls.append((split, id(params)))
    return {'last': x, 'last4': x}, y

  monkeypatch.setattr(features_lib, 'extract_features', fake_extract)
  config = probe_config('random', image_folder)
  config.evals.linear.update(lrs=(1e-1,), wds=(0.0,), epochs=2)
  mesh = sharding.make_mesh(sharding.MeshSpec.from_config(config))
  encoder = jepa.encoder_from_model_config(config.model)
  evals, data = base.EvalsSpec.from_config(config), DataSpec.from_config(config)
  cache = features_lib.FeatureCache.for_probe(encoder, data, mesh,
                                              train_examples=config.train_examples,
                                              eval_examples=config.eval_examples)
  params = {'fake': 1}
  knn = registry.build('knn', evals, data, mesh, encoder, features=cache).evaluate(params)
  linear = registry.build('linear', evals, data, mesh, encoder, features=cache).evaluate(params)
  assert set(knn) == set(linear) == {'last', 'last4'}
  assert knn['last'] == knn['last4'] and knn['last']['top1'] >= 0.9
  assert calls == [('train', id(params)), ('test', id(params))]
  # Other parameters: extracted anew, never answered from the old ones' features.
  other = {'fake': 2}
  cache.get(other, 'train', ('last', 'last4'))
  assert calls[-1] == ('train', id(other))
