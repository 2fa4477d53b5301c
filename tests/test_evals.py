"""The few-shot, low-shot and attentive evaluators (issue 15): float64 numpy references, the
sampling protocols, sharded = single device, the probe CLI's evaluator list end to end, and the
trainer's in-training few-shot monitor."""

import importlib.util
import json
import math
import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh
from PIL import Image

from cjepa_jax import sharding
from cjepa_jax import metrics as metrics_lib
from cjepa_jax.evals import attentive as attentive_lib
from cjepa_jax.evals import base
from cjepa_jax.evals import features as features_lib
from cjepa_jax.evals import fewshot as fewshot_lib
from cjepa_jax.evals import linear as linear_lib
from cjepa_jax.evals import runner
from cjepa_jax.models import vit

ROOT = pathlib.Path(__file__).resolve().parents[1]


def mesh_of(n):
  return Mesh(np.asarray(jax.devices()[:n]).reshape(n, 1), sharding.MESH_AXES)


def clusters(rng, n, num_classes, dim, spread):
  centres = rng.normal(size=(num_classes, dim)) * spread
  y = np.repeat(np.arange(num_classes), -(-n // num_classes))[:n].astype(np.int32)
  rng.shuffle(y)
  return (centres[y] + rng.normal(size=(n, dim))).astype(np.float32), y


# ------------------------------------------------------------------------------------------------
# Few-shot ridge regression.
# ------------------------------------------------------------------------------------------------


def ridge_numpy(x, y, num_classes, l2):
  """float64 closed form: standardise (std + 1e-5), bias column 100, W = (X^T X + l2 I)^-1 X^T Y."""
  x = x.astype(np.float64)
  mean, std = x.mean(0), x.std(0) + 1e-5
  xs = np.concatenate([(x - mean) / std, np.full((len(x), 1), 100.0)], axis=1)
  targets = 2.0 * np.eye(num_classes)[y] - 1.0
  w = np.linalg.solve(xs.T @ xs + l2 * np.eye(xs.shape[1]), xs.T @ targets)
  return w, mean, std


@pytest.mark.parametrize('n,dim', [(12, 40), (60, 8)])  # Fewer rows than features, and more.
def test_ridge_matches_float64_closed_form(n, dim):
  rng = np.random.default_rng(n)
  x, y = clusters(rng, n, 4, dim, spread=1.0)
  fit = fewshot_lib.ridge_fit(x, y, 4, l2_reg=8.0)
  w, mean, std = ridge_numpy(x, y, 4, 8.0)
  np.testing.assert_allclose(fit['mean'], mean, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(fit['std'], std, rtol=1e-5)
  # float32 eigh of a Gram matrix whose bias direction (100^2 * n) dwarfs the rest: ~1e-4 abs.
  np.testing.assert_allclose(fit['w'], w, rtol=2e-3, atol=5e-4 * np.abs(w).max())
  test_x, _ = clusters(rng, 50, 4, dim, spread=1.0)
  want = np.argmax(np.concatenate([(test_x - mean) / std, np.full((50, 1), 100.0)], 1) @ w, 1)
  np.testing.assert_array_equal(fewshot_lib.ridge_predict(fit, test_x), want)


def test_shot_indices_are_per_class_nested_and_seeded():
  labels = np.random.default_rng(0).integers(0, 5, size=300)
  idx10 = fewshot_lib.shot_indices(labels, 10, seed=3, num_classes=5)
  assert len(idx10) == 50 and len(set(idx10)) == 50
  assert np.bincount(labels[idx10], minlength=5).tolist() == [10] * 5
  idx5 = fewshot_lib.shot_indices(labels, 5, seed=3, num_classes=5)
  assert set(idx5) <= set(idx10)                                  # Nested within a seed.
  np.testing.assert_array_equal(idx10, fewshot_lib.shot_indices(labels, 10, 3, 5))
  assert set(fewshot_lib.shot_indices(labels, 10, 4, 5)) != set(idx10)
  with pytest.raises(ValueError, match='class 1 has 2 training examples, fewer than 3 shots'):
    fewshot_lib.shot_indices(np.array([0, 0, 0, 1, 1]), 3, 0, 2)


def test_fewshot_probe_separates_clusters_and_sharded_equals_single_device():
  rng = np.random.default_rng(1)
  x, y = clusters(rng, 400, 5, 16, spread=3.0)
  tx, ty = clusters(np.random.default_rng(1), 400, 5, 16, spread=3.0)  # Same centres.
  common = dict(num_classes=5, shots=(1, 5), seeds=3, l2_reg=1024.0)
  one = fewshot_lib.fewshot_probe(x, y, tx, ty, mesh=mesh_of(1), **common)
  eight = fewshot_lib.fewshot_probe(x, y, tx, ty, mesh=mesh_of(8), **common)
  assert one == eight
  assert one['top1'][5] >= 0.9 and len(one['per_seed'][1]) == 3
  assert one['top1'][1] == pytest.approx(np.mean(one['per_seed'][1]))


# ------------------------------------------------------------------------------------------------
# Low-shot subsets.
# ------------------------------------------------------------------------------------------------


def test_lowshot_subsets_are_class_balanced_and_seed_stable():
  labels = np.repeat(np.arange(10), [500, 500, 500, 500, 500, 300, 300, 300, 300, 300])
  idx = linear_lib.lowshot_indices(labels, 0.01, seed=0, num_classes=10)
  assert np.bincount(labels[idx]).tolist() == [5] * 5 + [3] * 5   # 1% of each class.
  np.testing.assert_array_equal(idx, linear_lib.lowshot_indices(labels, 0.01, 0, 10))
  assert not np.array_equal(idx, linear_lib.lowshot_indices(labels, 0.01, 1, 10))
  tiny = linear_lib.lowshot_indices(labels, 0.0001, 0, 10)        # At least one per class.
  assert np.bincount(labels[tiny]).tolist() == [1] * 10
  with pytest.raises(ValueError, match=r'lowshot.fractions must be in \(0, 1\]'):
    linear_lib.lowshot_indices(labels, 0.0, 0, 10)


def test_lowshot_linear_probe_sharded_equals_single_device():
  rng = np.random.default_rng(2)
  x, y = clusters(rng, 600, 3, 8, spread=3.0)
  idx = linear_lib.lowshot_indices(y, 0.1, 0, 3)
  common = dict(num_classes=3, lrs=(0.1, 1.0), wds=(0.0,), epochs=5, batch_size=16,
                holdout_fraction=0.2)
  one = linear_lib.linear_probe(x[idx], y[idx], x, y, mesh=mesh_of(1), **common)
  eight = linear_lib.linear_probe(x[idx], y[idx], x, y, mesh=mesh_of(8), **common)
  assert (one['best_lr'], one['top1']) == (eight['best_lr'], eight['top1'])
  assert one['top1'] >= 0.9


# ------------------------------------------------------------------------------------------------
# The attentive probe.
# ------------------------------------------------------------------------------------------------


def _ln(x, p):
  mean = x.mean(-1, keepdims=True)
  var = x.var(-1, keepdims=True)
  return (x - mean) / np.sqrt(var + vit.LN_EPS) * p['scale'] + p['bias']


def _dense(x, p):
  return x @ np.asarray(p['kernel'], np.float64) + np.asarray(p['bias'], np.float64)


def pooler_numpy(p, tokens, heads, *, uniform=False):
  """float64 forward of AttentivePooler; `uniform`: average the values instead of softmax."""
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), p)
  b, n, d = tokens.shape
  e = d // heads
  q = np.broadcast_to(p['query'][None], (b,) + p['query'].shape)
  x = _ln(tokens.astype(np.float64), p['norm1'])
  qp = _dense(q, p['q']).reshape(b, -1, heads, e)
  kv = _dense(x, p['kv'])
  k, v = kv[..., :d].reshape(b, n, heads, e), kv[..., d:].reshape(b, n, heads, e)
  if uniform:
    att = np.broadcast_to(v.mean(1, keepdims=True), (b, qp.shape[1], heads, e))
  else:
    logits = np.einsum('bqhe,bnhe->bhqn', qp, k) / math.sqrt(e)
    weights = np.exp(logits - logits.max(-1, keepdims=True))
    weights /= weights.sum(-1, keepdims=True)
    att = np.einsum('bhqn,bnhe->bqhe', weights, v)
  q = q + _dense(att.reshape(b, -1, d), p['proj'])
  h = _dense(_ln(q, p['norm2']), p['fc1'])
  h = 0.5 * h * (1.0 + np.vectorize(math.erf)(h / math.sqrt(2.0)))
  return q + _dense(h, p['fc2'])


def test_attentive_classifier_matches_numpy_forward():
  model = attentive_lib.AttentiveClassifier(num_classes=5, num_queries=2, num_heads=4)
  tokens = np.random.default_rng(3).normal(size=(3, 7, 16)).astype(np.float32)
  params = model.init(jax.random.key(0), tokens)['params']
  # Move every parameter away from its init (LayerNorms at 1 / 0 would hide a wrong use).
  rng = np.random.default_rng(4)
  params = jax.tree.map(lambda a: a + 0.3 * rng.normal(size=a.shape).astype(np.float32), params)
  logits = np.asarray(jax.jit(model.apply)({'params': params}, tokens), np.float64)
  pooled = pooler_numpy(params['pooler'], tokens, heads=4)                # [B, 2, D]
  z = _ln(pooled.mean(1), jax.tree.map(lambda a: np.asarray(a, np.float64), params['norm']))
  want = _dense(z, params['head'])
  np.testing.assert_allclose(logits, want, rtol=1e-4, atol=1e-4)


def test_one_query_with_equal_logits_is_mean_pooling():
  """A zero query projection makes every attention logit equal: the pooler averages the values."""
  pooler = attentive_lib.AttentivePooler(num_queries=1, num_heads=2)
  tokens = np.random.default_rng(5).normal(size=(4, 9, 8)).astype(np.float32)
  params = pooler.init(jax.random.key(1), tokens)['params']
  params['q'] = jax.tree.map(jnp.zeros_like, params['q'])
  out = np.asarray(jax.jit(pooler.apply)({'params': params}, tokens), np.float64)
  np.testing.assert_allclose(out, pooler_numpy(params, tokens, 2, uniform=True), rtol=1e-4,
                             atol=1e-5)


@pytest.mark.slow
def test_attentive_training_sharded_equals_single_device_and_learns():
  rng = np.random.default_rng(6)
  centres = rng.normal(size=(3, 1, 8)) * 2.0
  y = np.arange(96) % 3
  tokens = (centres[y] + rng.normal(size=(96, 5, 8))).astype(np.float16)   # [N, T, D], as stored
  model = attentive_lib.AttentiveClassifier(num_classes=3, num_heads=2)
  common = dict(lrs=(1e-3, 1e-2), wds=(0.01, 0.1), epochs=4, batch_size=16, warmup_epochs=1.0,
                seed=0)
  idx = np.arange(96)
  one = attentive_lib.train_attentive(model, tokens, y, idx, mesh=mesh_of(1), **common)
  eight = attentive_lib.train_attentive(model, tokens, y, idx, mesh=mesh_of(8), **common)
  # atol 5e-5: on parameters whose gradient is ~0, AdamW's normalised step turns float32
  # reduction-order noise (1 vs 8 devices) into differences of ~1e-5 (seen on one CPU), against
  # weights of ~1e-3.
  for a, b in zip(jax.tree.leaves(one), jax.tree.leaves(eight), strict=True):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=5e-5)
  result = attentive_lib.attentive_probe(tokens, y, tokens, y, num_classes=3, lrs=(1e-2,),
                                         wds=(0.01,), epochs=8, batch_size=16,
                                         holdout_fraction=0.0, num_heads=2, mesh=mesh_of(8))
  assert result['top1'] >= 0.9, result
  again = attentive_lib.attentive_probe(tokens, y, tokens, y, num_classes=3, lrs=(1e-2,),
                                        wds=(0.01,), epochs=8, batch_size=16,
                                        holdout_fraction=0.0, num_heads=2, mesh=mesh_of(8))
  assert again == result   # Deterministic for a seed.


def test_attentive_weight_decay_spares_biases_norms_and_the_query():
  model = attentive_lib.AttentiveClassifier(num_classes=3, num_heads=2)
  params = model.init(jax.random.key(0), np.zeros((1, 4, 8), np.float32))['params']
  mask = attentive_lib._decay_mask(params)  # pylint: disable=protected-access
  flat = {'/'.join(str(getattr(k, 'key', k)) for k in path): v
          for path, v in jax.tree_util.tree_leaves_with_path(mask)}
  assert flat['pooler/q/kernel'] and flat['head/kernel'] and flat['pooler/fc1/kernel']
  assert not flat['pooler/query'] and not flat['pooler/q/bias'] and not flat['norm/scale']


# ------------------------------------------------------------------------------------------------
# End to end: the probe CLI's evaluator list, and the trainer's few-shot monitor.
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope='module')
def image_folder(tmp_path_factory):
  """train/test with 3 colour-coded classes of 12 noisy 32x32 images each."""
  root = tmp_path_factory.mktemp('folder')
  rng = np.random.default_rng(0)
  for split in ('train', 'test'):
    for c, colour in enumerate(((200, 40, 40), (40, 180, 40), (50, 80, 220))):
      (root / split / f'class{c}').mkdir(parents=True)
      for i in range(12):
        pixels = np.clip(np.asarray(colour) + rng.normal(0, 40, size=(32, 32, 3)), 0, 255)
        Image.fromarray(pixels.astype(np.uint8)).save(root / split / f'class{c}' / f'{i}.png')
  return root


def probe_config(data_dir, evals):
  spec = importlib.util.spec_from_file_location('probe_linear', ROOT / 'configs/probe_linear.py')
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  c = module.get_config('cifar10')
  c.pretrained = 'random'
  c.probes = evals
  c.data.data_dir = str(data_dir)
  c.data.num_classes = 3
  c.model.depth = 1
  c.batch_size = 16
  c.evals.linear.update(epochs=5, batch_size=16, lrs=(1e-2, 1e-1), wds=(0.0,))
  c.evals.lowshot.update(fractions=(0.25,), epochs=5, batch_size=16, lrs=(1e-2, 1e-1), wds=(0.0,))
  c.evals.fewshot.update(shots=(1, 5), seeds=2)
  c.evals.attentive.update(epochs=2, batch_size=8, lrs=(1e-3,), wds=(0.01, 0.1))
  return c


@pytest.mark.slow
def test_probe_runs_every_evaluator_and_writes_one_json(image_folder, tmp_path, capsys):
  config = probe_config(image_folder, 'linear,knn,attentive,fewshot,lowshot')
  results = runner.run(config, str(tmp_path))
  saved = json.loads((tmp_path / runner.RESULTS_FILE).read_text())
  assert saved == json.loads(json.dumps(results)) and saved['complete']
  assert saved['evals'] == ['linear', 'knn', 'attentive', 'fewshot', 'lowshot']
  assert list(results)[:5] == saved['evals']
  assert saved['checkpoint'] == 'random' and saved['config']['probes'] == config.probes
  chosen = saved['linear']['features']
  assert saved['fewshot']['features'] == saved['lowshot']['features'] == chosen
  assert set(saved['fewshot']['top1']) == {'1', '5'} and saved['fewshot']['l2_reg'] == 1024.0
  low = saved['lowshot']['fractions']['25%']
  assert saved['unit'] == 'percent'   # Every accuracy below in %.
  assert low['num_train'] == 9 and 0 <= low['top1'] <= 100      # 3 of 12 per class.
  att = saved['attentive']
  assert att['best_wd'] in (0.01, 0.1) and len(att['sweep']) == 2 and 0 <= att['top1'] <= 100
  # Colour-coded classes: even a random encoder's features separate them.
  assert saved['linear']['top1'] >= 90 and saved['fewshot']['top1']['5'] >= 90
  table = capsys.readouterr().out
  assert 'top-1 / top-5 in %' in table
  assert f"{saved['linear']['top1']:>8.2f}{saved['linear']['top5']:>8.2f}" in table
  for row in ('linear *', 'knn k=20', 'fewshot 5-shot', 'lowshot 25% labels', 'attentive'):
    assert row in table, table


def test_probe_names_bad_evaluator_input(image_folder, tmp_path):
  config = probe_config(image_folder, 'fewshot')
  config.evals.fewshot.shots = (1, 20)
  with pytest.raises(ValueError, match='class 0 has 12 training examples, fewer than 20 shots'):
    runner.run(config, str(tmp_path))
  config = probe_config(image_folder, 'lowshot')
  config.evals.lowshot.fractions = (0.0,)
  with pytest.raises(ValueError, match='config.evals.lowshot.fractions'):
    runner.run(config, str(tmp_path))
  with pytest.raises(ValueError, match='labels span'):
    fewshot_lib.fewshot_probe(np.zeros((4, 2), np.float32), np.array([0, 1, 2, 5]),
                              np.zeros((2, 2), np.float32), np.array([0, 1]), num_classes=3,
                              shots=(1,))


def test_in_training_periods_make_log_steps():
  """Each in-training evaluator's period is a log step (the trainer's few-shot monitor landing in
  metrics.jsonl is checked on the CLI run of tests/test_train.py)."""
  spec = importlib.util.spec_from_file_location('recipe', ROOT / 'configs/cifar10_vit_tiny.py')
  recipe = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(recipe)
  c = recipe.get_config()
  c.log_every_steps = 20
  c.evals.knn.every_steps, c.evals.fewshot.every_steps = 0, 3
  def log_step(step):
    periods = base.EvalsSpec.from_config(c).periods().values()
    return metrics_lib.is_log_step(step, c.log_every_steps, periods, 100)

  assert log_step(3) and log_step(20)
  assert not log_step(5) and log_step(100)
  c.evals.fewshot.every_steps = 0
  assert not log_step(3)
  assert features_lib.TOKENS not in features_lib.FEATURE_KINDS  # Pooled kinds stay pooled.


def test_a_run_stopped_midway_keeps_the_evaluators_it_finished(image_folder, tmp_path,
                                                               monkeypatch):
  config = probe_config(image_folder, 'fewshot,linear')

  def broken(*args, **kwargs):
    raise RuntimeError('stopped')

  monkeypatch.setattr(fewshot_lib, 'fewshot_probe', broken)
  with pytest.raises(RuntimeError, match='stopped'):
    runner.run(config, str(tmp_path))
  saved = json.loads((tmp_path / runner.RESULTS_FILE).read_text())
  assert not saved['complete'] and 'linear' in saved and 'fewshot' not in saved
  assert saved['checkpoint'] == 'random' and saved['linear']['top1'] >= 90   # In %.


def test_probe_loops_keep_at_most_two_steps_in_flight(monkeypatch):
  """Many queued steps with collectives over several CPU devices can deadlock XLA:CPU, which then
  aborts the process (linear.py, MAX_STEPS_IN_FLIGHT): the linear probe waits every 2 steps."""
  waited = []
  real = jax.block_until_ready
  monkeypatch.setattr(linear_lib.jax, 'block_until_ready', lambda t: waited.append(1) or real(t))
  x = np.random.default_rng(0).normal(size=(64, 4)).astype(np.float32)
  y = np.arange(64) % 2
  params = linear_lib.train_linear(x, y, np.arange(64), x.mean(0), x.std(0), num_classes=2,
                                   lrs=[0.1], wds=[0.0], epochs=2, batch_size=8, seed=0,
                                   mesh=mesh_of(8))
  monkeypatch.undo()
  steps = 2 * 64 // 8
  assert linear_lib.MAX_STEPS_IN_FLIGHT == 2 and len(waited) == steps // 2
  assert np.all(np.isfinite(jax.tree.leaves(params)[0]))


# ------------------------------------------------------------------------------------------------
# Adding an evaluator: one file (tests/toy_evaluator.py) and its one registration.
# ------------------------------------------------------------------------------------------------


@pytest.mark.slow   # A pretraining run and a probe run: ~90 s on 2 cores.
def test_a_new_evaluator_runs_in_the_trainer_and_the_probe(image_folder, tmp_path, capsys,
                                                           monkeypatch):
  from cjepa_jax.evals import registry as registry_lib  # pylint: disable=g-import-not-at-top
  # The registration lasts for this test only: the registry of later tests in this process is
  # the built-in one.
  monkeypatch.setattr(registry_lib, '_TYPES', dict(registry_lib._TYPES))
  monkeypatch.delitem(sys.modules, 'toy_evaluator', raising=False)
  import toy_evaluator  # pylint: disable=g-import-not-at-top,unused-import  (registers 'toy')
  from cjepa_jax import train  # pylint: disable=g-import-not-at-top
  import ml_collections  # pylint: disable=g-import-not-at-top

  toy = ml_collections.ConfigDict(dict(type='toy', every_steps=2, shift=0))
  spec = importlib.util.spec_from_file_location('recipe', ROOT / 'configs/cifar10_vit_tiny.py')
  recipe = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(recipe)
  c = recipe.get_config()
  c.data.update(data_dir=str(image_folder), num_classes=3, num_train_examples=36)
  c.model.update(depth=1, pred_depth=1, pred_width=48)
  c.update(batch_size=16, total_steps=4, log_every_steps=4)
  c.evals.knn.every_steps = 0
  with c.unlocked():
    c.evals.toy = toy
  train.train_and_evaluate(c, str(tmp_path / 'run'))
  rows = [json.loads(line) for line in open(tmp_path / 'run' / 'metrics.jsonl', encoding='utf-8')]
  assert [r['step'] for r in rows if 'toy_top1' in r] == [2, 4]
  assert all(r['toy_top1'] == pytest.approx(100 / 3) and r['unit'] == 'percent'
             for r in rows if 'toy_top1' in r)

  config = probe_config(image_folder, 'toy,knn')
  with config.unlocked():
    config.evals.toy = toy
  results = runner.run(config, str(tmp_path / 'probe'))
  assert results['toy']['top1'] == pytest.approx(100 / 3) and results['evals'] == ['toy', 'knn']
  assert 'toy' in capsys.readouterr().out
  with config.unlocked():
    config.evals.toy = ml_collections.ConfigDict(dict(type='toy', shift='one'))
  with pytest.raises(ValueError, match=r"^config.evals.toy.shift='one' is invalid"):
    runner.run(config, str(tmp_path / 'probe'))


def test_old_evaluator_flags_still_work_for_one_release_with_a_warning(capsys):
  from cjepa_jax import cli  # pylint: disable=g-import-not-at-top
  from cjepa_jax import config as config_lib  # pylint: disable=g-import-not-at-top
  argv = ['probe', '--config=x.py', '--config.evals=linear,knn', '--config.knn.k', '5',
          '--config.linear.lrs=(0.1,)', '--config.linear.epochs=3', '--config.evals.knn.k=7']
  assert cli.rename_flags('cjepa-probe', argv, config_lib.RENAMED_PROBE) == [
      'probe', '--config=x.py', '--config.probes=linear,knn', '--config.evals.knn.k=5',
      '--config.evals.linear.lrs=(0.1,)', '--config.evals.lowshot.lrs=(0.1,)',
      '--config.evals.linear.epochs=3', '--config.evals.knn.k=7']
  warnings = capsys.readouterr().err.splitlines()
  assert len(warnings) == 4 and warnings[0] == (
      'cjepa-probe: warning: --config.evals is deprecated and goes in the next release; use '
      '--config.probes.')
  assert cli.rename_flags('cjepa-train', ['t', '--config.evals.knn_batch_size=8'],
                          config_lib.RENAMED_PRETRAINING)[1:] == [
      '--config.evals.knn.eval_batch_size=8', '--config.evals.fewshot.eval_batch_size=8']
  assert cli.rename_flags('cjepa-finetune', ['f', '--config.eval_every_steps=5'],
                          config_lib.RENAMED_FINETUNING)[1:] == [
      '--config.evals.classify.every_steps=5']
