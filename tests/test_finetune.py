"""Fine-tuning (issue 16): Mixup / CutMix against numpy, the LLRD optimizer, the classifier head,
8 devices = 1, only the encoder restored, clear errors, and the CLI with exact SIGKILL resume."""

import copy
import importlib.util
import json
import os
import pathlib
import signal
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import Mesh
from PIL import Image

from cjepa_jax.checkpoint import manager as ckpt_manager
from cjepa_jax.checkpoint import reading as ckpt_reading
from cjepa_jax import config as config_lib
from cjepa_jax import finetune
from cjepa_jax import finetune_step as step_lib
from cjepa_jax import mixup
from cjepa_jax import optim
from cjepa_jax import sharding
from cjepa_jax import train_step as pretrain_step
from cjepa_jax.evals import features as features_lib
from cjepa_jax.models import jepa
from cjepa_jax.models import vit
import pretrained_utils
from multiprocess_utils import xla_flags

ROOT = pathlib.Path(__file__).resolve().parents[1]


def load_recipe(name, arg=None):
  spec = importlib.util.spec_from_file_location(name, ROOT / 'configs' / f'{name}.py')
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg) if arg else module.get_config()


def tiny_config(**overrides):
  """The CIFAR recipe on synthetic data, a 1-block encoder, 16 images a batch."""
  c = load_recipe('finetune_cifar10')
  c.pretrained = 'random'
  c.data.dataset = 'synthetic'
  c.batch_size = 16
  c.total_steps = 6
  c.model.depth = 1
  c.log_every_steps = 2
  c.ckpt_every_steps = 2
  c.evals.classify.update(every_steps=3, eval_batch_size=16, eval_examples=32)
  c.optim.warmup_steps = 2
  c.update_from_flattened_dict(overrides)  # Dotted keys, e.g. 'model.depth'.
  return c


# ------------------------------------------------------------------------------------------------
# Mixup / CutMix.
# ------------------------------------------------------------------------------------------------


def numpy_mix(images, labels, lam, use_cutmix, box, num_classes, smoothing):
  """timm's Mixup(mode='batch') on given draws, in float64."""
  x = np.asarray(images, np.float64)
  flipped = x[::-1]
  if use_cutmix:
    out = x.copy()
    t, b, l, r = box
    out[:, t:b, l:r, :] = flipped[:, t:b, l:r, :]
  else:
    out = lam * x + (1 - lam) * flipped
  y = np.full((len(labels), num_classes), smoothing / num_classes)
  y[np.arange(len(labels)), labels] += 1 - smoothing
  return out, lam * y + (1 - lam) * y[::-1]


@pytest.mark.parametrize('mixup_alpha,cutmix_alpha', [(0.8, 1.0), (0.8, 0.0), (0.0, 1.0)])
def test_mixup_and_cutmix_match_numpy_and_targets_sum_to_one(mixup_alpha, cutmix_alpha):
  spec = mixup.MixSpec(mixup_alpha, cutmix_alpha, 0.5, 0.1, 10)
  rng = np.random.default_rng(0)
  images = rng.normal(size=(6, 12, 10, 3)).astype(np.float32)
  labels = rng.integers(0, 10, size=6).astype(np.int32)
  seen_cutmix = set()
  sample = jax.jit(mixup.sample, static_argnums=(1, 2, 3))   # Eager dispatch is slow on CPU.
  apply = jax.jit(mixup.apply, static_argnums=3)
  for seed in range(12):
    params = sample(jax.random.key(seed), spec, 12, 10)
    lam, use_cutmix = float(params.lam), bool(params.use_cutmix)
    box = [int(v) for v in params.box]
    seen_cutmix.add(use_cutmix)
    if use_cutmix:   # lam is the kept area exactly (timm's correct_lam).
      assert lam == pytest.approx(1 - (box[1] - box[0]) * (box[3] - box[2]) / 120, abs=1e-6)
      assert 0 <= box[0] <= box[1] <= 12 and 0 <= box[2] <= box[3] <= 10
    assert 0.0 <= lam <= 1.0
    out, targets = apply(jnp.asarray(images), jnp.asarray(labels), params, spec)
    want_x, want_y = numpy_mix(images, labels, lam, use_cutmix, box, 10, 0.1)
    np.testing.assert_allclose(np.asarray(out), want_x, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(targets), want_y, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(targets).sum(-1), 1.0, rtol=1e-6)
  # Both on: both happen (p = 0.5 each over 12 draws); one on: only that one.
  assert seen_cutmix == {True, False} if mixup_alpha and cutmix_alpha else {bool(cutmix_alpha)}


def test_cutmix_box_is_timms_rand_bbox():
  # cut_rat = sqrt(1 - lam); cut = int(side * cut_rat); centre +- cut // 2, clipped.
  for lam, (cy, cx) in ((0.75, (5, 5)), (0.1, (0, 9)), (0.5, (11, 0)), (1.0, (3, 3))):
    box = [int(v) for v in mixup.cutmix_box(jnp.float32(lam), jnp.array([cy, cx]), 12, 10)]
    ch, cw = int(12 * np.sqrt(1 - lam)), int(10 * np.sqrt(1 - lam))
    assert box == [np.clip(cy - ch // 2, 0, 12), np.clip(cy + ch // 2, 0, 12),
                   np.clip(cx - cw // 2, 0, 10), np.clip(cx + cw // 2, 0, 10)]


def test_no_mixing_is_label_smoothing_only():
  spec = mixup.MixSpec(0.0, 0.0, 0.5, 0.1, 4)
  images = jnp.ones((2, 4, 4, 3))
  out, y = mixup.mix_batch(jax.random.key(0), images, jnp.array([0, 3]), spec)
  assert out is images
  np.testing.assert_allclose(np.asarray(y), [[0.925, 0.025, 0.025, 0.025],
                                             [0.025, 0.025, 0.025, 0.925]])


# ------------------------------------------------------------------------------------------------
# Optimizer, schedule, head.
# ------------------------------------------------------------------------------------------------


def test_lr_schedule_warms_up_from_zero_then_cosine_to_final():
  c = tiny_config(**{'optim.warmup_steps': 4, 'optim.base_lr': 2e-3, 'optim.final_lr': 1e-5})
  peak = 2e-3 * 16 / 256
  adamw = optim.LayerDecayAdamW.from_config(c)
  assert adamw.peak_lr == pytest.approx(peak)
  sched = optim.finetune_lr_schedule(adamw, optim.RunLength(20, 10))
  for k in range(21):
    if k < 4:
      want = peak * k / 4
    else:
      want = 1e-5 + (peak - 1e-5) * 0.5 * (1 + np.cos(np.pi * (k - 4) / 16))
    assert float(sched(k)) == pytest.approx(want, rel=1e-5, abs=1e-12), k


def test_every_update_is_scaled_by_its_layer_multiplier():
  """The optimizer's update of each parameter = AdamW's update x decay^(depth + 1 - layer)."""
  c = tiny_config(**{'model.depth': 3, 'optim.layer_decay': 0.5, 'optim.warmup_steps': 0})
  encoder, _ = features_lib.resolve_encoder(features_lib.EncoderSource.from_config(c))
  run = step_lib.setup(step_lib.StepSpec.from_config(c),
                       Mesh(np.asarray(jax.devices()[:1]).reshape(1, 1), sharding.MESH_AXES),
                       encoder)
  params = run.init_fn()['params']
  grads = jax.tree.map(lambda p: jnp.ones_like(p) * 0.01, params)
  plain = optax.adamw(run.schedule, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.05,
                      mask=optim.weight_decay_mask)
  want, _ = jax.jit(plain.update)(grads, plain.init(params), params)
  got, _ = jax.jit(run.tx.update)(grads, run.tx.init(params), params)
  for path, g in jax.tree_util.tree_leaves_with_path(got):
    names = [str(getattr(k, 'key', k)) for k in path]
    if names[0] != 'encoder':
      m = 1.0
    elif names[1] == 'patch_embed':
      m = 0.5 ** 4
    elif names[1].startswith('blocks_'):
      m = 0.5 ** (3 - int(names[1].split('_')[1]))
    else:   # The encoder's final norm.
      m = 1.0
    w = want
    for k in path:
      w = w[getattr(k, 'key', k)]
    np.testing.assert_allclose(np.asarray(g), m * np.asarray(w), rtol=1e-6, err_msg=str(names))


def test_classifier_is_mean_pool_layernorm_linear():
  encoder = vit.Encoder(variant='Ti/4', depth=1)
  from cjepa_jax.models import classifier  # pylint: disable=g-import-not-at-top
  model = classifier.Classifier(encoder, 5)
  images = jax.random.normal(jax.random.key(1), (3, 16, 16, 3))
  params = jax.jit(model.init)(jax.random.key(0), images)['params']
  assert set(params) == {'encoder', 'head_norm', 'head'}
  params['head']['kernel'] = jax.random.normal(jax.random.key(2), (192, 5))  # Not ~0.
  tokens = np.asarray(jax.jit(encoder.apply)({'params': params['encoder']}, images), np.float64)
  pooled = tokens.mean(1)
  normed = (pooled - pooled.mean(-1, keepdims=True)) / np.sqrt(pooled.var(-1, keepdims=True)
                                                              + vit.LN_EPS)
  normed = normed * np.asarray(params['head_norm']['scale']) + np.asarray(
      params['head_norm']['bias'])
  want = normed @ np.asarray(params['head']['kernel'], np.float64) + np.asarray(
      params['head']['bias'])
  np.testing.assert_allclose(np.asarray(jax.jit(model.apply)({'params': params}, images)), want,
                             rtol=1e-4, atol=1e-4)


# ------------------------------------------------------------------------------------------------
# Sharding, restore, errors.
# ------------------------------------------------------------------------------------------------


def _batch(config, seed):
  rng = np.random.default_rng(seed)
  size = config.data.image_size
  return {'image': rng.normal(size=(config.batch_size, size, size, 3)).astype(np.float32),
          'label': rng.integers(0, 10, size=config.batch_size).astype(np.int32)}


def _steps(config, devices, mesh_shape, n):
  mesh = Mesh(np.asarray(devices).reshape(mesh_shape), sharding.MESH_AXES)
  encoder, info = features_lib.resolve_encoder(features_lib.EncoderSource.from_config(config))
  run = step_lib.setup(step_lib.StepSpec.from_config(config), mesh, encoder)
  state = finetune.initial_state(run, config.seed, encoder, info, mesh)
  losses = []
  for s in range(n):
    batch = {k: jax.device_put(v, sharding.batch_sharding(mesh))
             for k, v in _batch(config, s).items()}
    state, metrics = run.jitted_step(state, batch)
    losses.append(float(metrics['loss']))
  return jax.device_get(state), losses, run.trace_count[0]


@pytest.mark.slow
def test_sharded_equals_single_device():
  """Mesh data 4 x fsdp 2 on 8 fake devices == 1 device: Mixup / CutMix pair the global batch's
  mirror and drop path draws its mask for the global batch, so neither depends on the sharding."""
  config = tiny_config(**{'optim.eps': 1e-6})   # See test_train_step's sharded test.
  one, losses1, c1 = _steps(config, jax.devices()[:1], (1, 1), 3)
  eight, losses8, c8 = _steps(config, jax.devices(), (4, 2), 3)
  assert c1 == c8 == 1
  np.testing.assert_allclose(losses8, losses1, rtol=1e-5)
  for a, b in zip(jax.tree.leaves(one['params']), jax.tree.leaves(eight['params']), strict=True):
    np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-6)
  assert losses1[0] != losses1[1]  # Training moves.


@pytest.fixture(scope='module')
def pretrained(tmp_path_factory):
  """A pretraining checkpoint (the CIFAR recipe's encoder at depth 1) with target != context."""
  workdir = tmp_path_factory.mktemp('pretrained')

  def move(state):
    state['target_params'] = jax.tree.map(lambda x: x + 1.0, state['target_params'])
    return state

  state = pretrained_utils.save_pretraining_checkpoint(workdir, load_recipe_pretrain(), 7, move)
  return workdir, state


def load_recipe_pretrain():
  c = load_recipe('cifar10_vit_tiny')
  c.model.depth, c.model.pred_depth, c.model.pred_width = 1, 1, 48
  return c


@pytest.mark.parametrize('which,key', [('target', ('target_params',)),
                                       ('context', ('params', 'encoder'))])
def test_only_the_encoder_is_restored(pretrained, which, key):
  workdir, saved = pretrained
  config = tiny_config(pretrained=str(workdir), encoder=which, **{'model.depth': 3})
  mesh = Mesh(np.asarray(jax.devices()).reshape(4, 2), sharding.MESH_AXES)
  encoder, info = features_lib.resolve_encoder(features_lib.EncoderSource.from_config(config))
  assert info['step'] == 7 and encoder.num_layers == 1  # The checkpoint's depth, not 3.
  resolved = config_lib.resolve_finetune(config, info['model'])
  run = step_lib.setup(step_lib.StepSpec.from_config(resolved), mesh, encoder)
  state = jax.device_get(finetune.initial_state(run, config.seed, encoder, info, mesh))
  want = saved
  for k in key:
    want = want[k]
  for a, b in zip(jax.tree.leaves(state['params']['encoder']), jax.tree.leaves(want), strict=True):
    np.testing.assert_array_equal(a, b)
  fresh = jax.device_get(run.init_fn())
  for name in ('head', 'head_norm'):
    for a, b in zip(jax.tree.leaves(state['params'][name]), jax.tree.leaves(fresh['params'][name])):
      np.testing.assert_array_equal(a, b)
  assert int(state['step']) == 0
  moments = [x for x in jax.tree.leaves(state['opt_state']) if np.ndim(x) > 0]
  assert moments and all(not np.any(x) for x in moments)  # Fresh Adam moments, nothing restored.


def test_errors_name_the_problem(pretrained, tmp_path):
  workdir, _ = pretrained
  with pytest.raises(ValueError, match=r'at image size 32 but config.data.image_size=64'):
    finetune.finetune(tiny_config(pretrained=str(workdir), **{'data.image_size': 64}),
                      str(tmp_path / 'a'))
  with pytest.raises(ValueError, match='No complete checkpoint under'):
    finetune.finetune(tiny_config(pretrained=str(tmp_path)), str(tmp_path / 'b'))
  with pytest.raises(ValueError, match=r'--config.pretrained=random \(the baseline\)'):
    finetune.finetune(tiny_config(pretrained=''), str(tmp_path / 'c'))
  with pytest.raises(ValueError, match=r'config.optim.layer_decay=0.0 is invalid'):
    finetune.finetune(tiny_config(**{'optim.layer_decay': 0.0}), str(tmp_path / 'd'))
  # An image folder with more classes than the head (labels out of range).
  folder = tmp_path / 'images'
  for split in ('train', 'test'):
    for c, colour in enumerate(((200, 0, 0), (0, 200, 0), (0, 0, 200))):
      (folder / split / f'class{c}').mkdir(parents=True)
      Image.new('RGB', (32, 32), colour).save(folder / split / f'class{c}' / 'a.jpg')
  with pytest.raises(ValueError, match=r'has 3 classes but config.data.num_classes=2'):
    finetune.finetune(tiny_config(**{'data.dataset': 'image_folder', 'data.num_classes': 2,
                                     'data.data_dir': str(folder)}), str(tmp_path / 'e'))
  assert not [p for p in tmp_path.iterdir() if p.name in 'abcde'], 'a failed start left a workdir'


# ------------------------------------------------------------------------------------------------
# The CLI: a straight run, and SIGKILL + resume ending bit-identical to it.
# ------------------------------------------------------------------------------------------------


CLI_ARGS = ('--config', 'configs/finetune_cifar10.py', '--config.pretrained=random',
            '--config.data.dataset=synthetic', '--config.batch_size=16',
            '--config.total_steps=6', '--config.model.depth=1', '--config.log_every_steps=2',
            '--config.evals.classify.every_steps=3', '--config.ckpt_every_steps=2',
            '--config.evals.classify.eval_batch_size=16', '--config.evals.classify.eval_examples=32',
            '--config.optim.warmup_steps=2')

# SIGKILL at the first save after step KILL_AT, once every save so far is durable.
_KILL_HARNESS = textwrap.dedent('''
    import os, signal, sys
    from cjepa_jax import finetune
    from cjepa_jax.checkpoint import manager as ckpt_manager
    init, save, opened = ckpt_manager.Checkpointer.__init__, ckpt_manager.Checkpointer.save, []
    def recording_init(self, *args, **kwargs):
      init(self, *args, **kwargs)
      opened.append(self)
    def killing_save(self, step, *args, **kwargs):
      if step > int(os.environ['KILL_AT']):
        for ckpt in opened:
          ckpt.wait()
        os.kill(os.getpid(), signal.SIGKILL)
      return save(self, step, *args, **kwargs)
    ckpt_manager.Checkpointer.__init__ = recording_init
    ckpt_manager.Checkpointer.save = killing_save
    sys.argv = ['finetune'] + sys.argv[1:]
    finetune.run()
''')


def run_python(args, **env_extra):
  env = dict(os.environ, XLA_FLAGS=xla_flags(1),
             JAX_PLATFORMS='cpu', TF_CPP_MIN_LOG_LEVEL='3', **env_extra)
  return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True,
                        text=True, timeout=600)


def rows_of(workdir):
  return [json.loads(line) for line in open(workdir / 'metrics.jsonl', encoding='utf-8')]


@pytest.fixture(scope='module')
def straight(tmp_path_factory):
  workdir = tmp_path_factory.mktemp('ft') / 'run'
  result = run_python(['-m', 'cjepa_jax.finetune', *CLI_ARGS, '--workdir', str(workdir)])
  assert result.returncode == 0, result.stderr[-3000:]
  return workdir, result


@pytest.mark.slow
def test_cli_trains_evaluates_and_keeps_best_and_last(straight):
  workdir, result = straight
  rows = rows_of(workdir)
  assert [r['step'] for r in rows] == [2, 3, 4, 6]   # Log every 2 steps, and each evaluation.
  evals = [r for r in rows if 'eval_top1' in r]
  assert [r['step'] for r in evals] == [3, 6]
  for r in evals:
    assert 0 <= r['eval_top1'] <= r['eval_top5'] <= 100 and r['eval_examples'] == 32
    assert np.isfinite(r['eval_loss'])
  best = max(evals, key=lambda r: (r['eval_top1'], -r['step']))
  assert evals[-1]['best_top1'] == best['eval_top1'] and evals[-1]['best_step'] == best['step']
  assert all(r['compiles'] == 1 and np.isfinite(r['loss']) for r in rows)
  assert ckpt_manager.Checkpointer(str(workdir)).all_steps() == [4, 6]
  assert ckpt_manager.Checkpointer(str(workdir / 'best')).all_steps() == [best['step']]
  (line,) = [json.loads(x) for x in result.stdout.splitlines() if x.startswith('{')]
  assert line['step'] == 6 and line['eval_top1'] == evals[-1]['eval_top1']
  assert 'step 6/6' in result.stderr
  saved = json.load(open(workdir / 'config.json', encoding='utf-8'))
  assert saved['model']['variant'] == 'Ti/4' and saved['total_steps'] == 6


@pytest.mark.slow
def test_sigkill_then_resume_ends_bit_identical(straight, tmp_path):
  reference, _ = straight
  workdir = tmp_path / 'run'
  killed = run_python(['-c', _KILL_HARNESS, *CLI_ARGS, '--workdir', str(workdir)], KILL_AT='2')
  assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
  assert ckpt_manager.Checkpointer(str(workdir)).all_steps() == [2]
  resumed = run_python(['-m', 'cjepa_jax.finetune', *CLI_ARGS, '--workdir', str(workdir)])
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  assert 'Resuming from the checkpoint of step 2' in resumed.stderr
  a = {r['step']: r for r in rows_of(reference)}
  b = {r['step']: r for r in rows_of(workdir)}   # The resumed run re-logs from step 3 on.
  for step in (3, 6):
    for key in ('eval_top1', 'eval_loss', 'best_top1', 'param_norm'):
      assert a[step][key] == b[step][key], (step, key)
  la = jax.tree.leaves(ckpt_reading.restore_subtree(str(reference), ()))
  lb = jax.tree.leaves(ckpt_reading.restore_subtree(str(workdir), ()))
  for x, y in zip(la, lb, strict=True):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_recipes_follow_mae():
  for variant, epochs, base_lr, decay, drop in (('B/16', 100, 5e-4, 0.65, 0.1),
                                                ('L/16', 50, 1e-3, 0.75, 0.2),
                                                ('H/14', 50, 1e-3, 0.75, 0.3)):
    c = load_recipe('finetune_in1k', variant)
    config_lib.validate_finetune(dict_to_config(c, pretrained='x'))
    assert (c.model.variant, c.epochs, c.optim.base_lr, c.optim.layer_decay,
            c.model.drop_path_rate) == (variant, epochs, base_lr, decay, drop)
    assert (c.batch_size, c.optim.weight_decay, c.mix.mixup_alpha, c.mix.cutmix_alpha,
            c.mix.label_smoothing, tuple(c.data.crop_scale)) == (
                1024, 0.05, 0.8, 1.0, 0.1, (0.08, 1.0))
  c = load_recipe('finetune_cifar10')
  assert (c.model.variant, c.model.depth, c.data.image_size) == ('Ti/4', 4, 32)


def dict_to_config(c, **overrides):
  c = copy.deepcopy(c)
  for k, v in overrides.items():
    c[k] = v
  return c


@pytest.mark.slow
def test_a_run_without_ema_gives_its_context_encoder_as_the_target(tmp_path):
  """use_ema=False checkpoints hold no target_params: probes and fine-tuning asking for the
  target encoder get the online (context) encoder, which is what the targets came from."""
  c = load_recipe_pretrain()
  c.use_ema = False
  models = jepa.build_models(jepa.ModelSpec.from_config(c))
  adamw = optim.AdamW.from_config(c)
  tx = optim.make_optimizer(adamw, optim.make_schedules(adamw, optim.RunLength(10, 10)))
  state = pretrained_utils.save_pretraining_checkpoint(tmp_path, c, 3, lambda s: s)
  assert 'target_params' not in state
  config = tiny_config(pretrained=str(tmp_path))
  encoder, info = features_lib.resolve_encoder(features_lib.EncoderSource.from_config(config))
  assert info['encoder'] == 'context'
  params = features_lib.load_encoder_params(config.seed, encoder, info, sharding.replicated(
      Mesh(np.asarray(jax.devices()[:1]).reshape(1, 1), sharding.MESH_AXES)))
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(state['params']['encoder']),
                  strict=True):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  # Pretraining with EMA from it: the target starts as its online encoder.
  c.use_ema = True
  run_state = jax.jit(lambda: pretrain_step.init_state(models, tx, 1))()
  shardings = jax.tree.map(lambda _: jax.sharding.SingleDeviceSharding(jax.devices()[0]),
                           run_state)
  loaded = ckpt_reading.load_init_from(str(tmp_path), run_state, shardings)
  for a, b in zip(jax.tree.leaves(loaded['target_params']),
                  jax.tree.leaves(state['params']['encoder']), strict=True):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_probing_a_finetuning_workdir_takes_its_encoder_or_says_how(straight):
  """A fine-tuning checkpoint has no EMA target: the default is refused in one line naming the
  fix; `encoder=context` restores the fine-tuned encoder (params/encoder)."""
  import ml_collections  # pylint: disable=g-import-not-at-top
  workdir, _ = straight
  config = ml_collections.ConfigDict({'pretrained': str(workdir), 'encoder': 'target', 'seed': 0})
  with pytest.raises(ValueError) as e:
    features_lib.resolve_encoder(features_lib.EncoderSource.from_config(config))
  message = str(e.value)
  assert '\n' not in message and 'is a fine-tuning checkpoint (cjepa-finetune)' in message
  assert '--config.encoder=context' in message and '--config.pretrained=' in message
  config.encoder = 'context'
  encoder, info = features_lib.resolve_encoder(features_lib.EncoderSource.from_config(config))
  assert info['encoder'] == 'context' and info['step'] == 6
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  params = features_lib.load_encoder_params(config.seed, encoder, info, device)
  want = ckpt_reading.restore_subtree(str(workdir), ('params', 'encoder'))
  for x, y in zip(jax.tree.leaves(params), jax.tree.leaves(want), strict=True):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_finetuning_refuses_a_workdir_another_trainer_holds(tmp_path):
  """The lock of a live trainer on another host: refused in one line, nothing else written."""
  from cjepa_jax import workdir_lock  # pylint: disable=g-import-not-at-top
  workdir = tmp_path / 'run'
  workdir.mkdir()
  (workdir / 'trainer.lock').write_text(json.dumps(
      {'host': 'node-3', 'pid': 77, 'started': '2026-12-01T00:00:00+00:00', 'token': 't'}))
  with pytest.raises(workdir_lock.WorkdirLockedError, match='host node-3, pid 77') as e:
    finetune.finetune(tiny_config(), str(workdir))
  assert '\n' not in str(e.value) and 'force_unlock' in str(e.value)
  assert sorted(p.name for p in workdir.iterdir()) == ['trainer.lock']
