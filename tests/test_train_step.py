"""The sharded train step: learning, sharded == single device, one compile, the EMA target."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cjepa_jax import config as config_lib
from cjepa_jax import losses
from cjepa_jax import optim
from cjepa_jax import sharding
from cjepa_jax import metrics as metrics_lib
from cjepa_jax import train_step as step_lib
from cjepa_jax.evals import base as evals_base
from cjepa_jax.models import jepa


def tiny_config(vicreg_weight=0.0, mode='context', batch_size=16, total_steps=50):
  c = config_lib.default_config()
  c.batch_size = batch_size
  c.total_steps = total_steps
  c.data.dataset = 'synthetic'
  c.data.image_size = 32
  c.data.num_train_examples = 1024
  c.model.variant = 'Ti/4'
  c.model.depth = 2
  c.model.dtype = 'float32'
  c.model.pred_width = 48
  c.model.pred_depth = 1
  c.mask.min_keep = 4
  c.optim.warmup_steps = 5
  c.optim.lr = 1e-3
  c.vicreg.weight = vicreg_weight
  c.vicreg.mode = mode
  c.vicreg.projector = '64-64'
  c.mesh.data = -1
  c.mesh.fsdp = 1
  return c


def fixed_batch(config, seed=0):
  rng = np.random.default_rng(seed)
  size = config.data.image_size
  # Smooth images (low-frequency structure) so there is something to predict.
  base = rng.normal(size=(config.batch_size, 4, 4, 3)).astype(np.float32)
  images = np.repeat(np.repeat(base, size // 4, axis=1), size // 4, axis=2)
  return {'image': images, 'label': np.zeros((config.batch_size,), np.int32)}


def run_steps(config, devices, num_steps, batches):
  mesh = sharding.make_mesh(sharding.MeshSpec.from_config(config), devices)
  run = step_lib.setup(step_lib.StepSpec.from_config(config), mesh)
  state = run.init_fn()
  bs = sharding.batch_sharding(mesh)
  losses = []
  for i in range(num_steps):
    batch = jax.device_put(batches[i % len(batches)], bs)
    state, metrics, _ = run.jitted_step(state, batch)
    losses.append(float(metrics['loss']))
  return state, np.array(losses), run.trace_count[0]


@pytest.mark.slow
def test_tiny_model_overfits_fixed_batch():
  config = tiny_config(total_steps=60)
  batch = fixed_batch(config)
  _, losses, compiles = run_steps(config, jax.devices()[:1], 60, [batch])
  assert np.all(np.isfinite(losses))
  # The loss falls clearly: the last 10 steps average well under the first 5.
  assert losses[-10:].mean() < 0.6 * losses[:5].mean(), losses
  assert compiles == 1


@pytest.mark.parametrize('mode', ['context', pytest.param('blocks', marks=pytest.mark.slow)])
def test_sharded_equals_single_device(mode):
  """Mesh data 4 x fsdp 2 on 8 fake devices == 1 device, with the VICReg terms on.

  The VICReg variance / covariance need the global batch: a per-device statistic would differ.
  Adam divides by sqrt(v) + eps, so a gradient element that is pure cancellation noise
  (|g| ~ eps) turns a harmless float32 summation-order difference into an O(lr) update
  difference; optim.eps = 1e-6 keeps such elements linear in g, so the comparison tests the
  sharding rather than Adam's conditioning.
  """
  assert jax.device_count() == 8, 'conftest sets 8 fake CPU devices'
  results = {}
  for name, devices, mesh in (('1', jax.devices()[:1], (1, 1)), ('8', jax.devices(), (4, 2))):
    config = tiny_config(vicreg_weight=0.5, mode=mode, total_steps=4)
    config.model.depth = 1
    config.optim.eps = 1e-6
    config.mesh.data, config.mesh.fsdp = mesh
    batches = [fixed_batch(config, seed=s) for s in range(3)]
    results[name] = run_steps(config, devices, 3, batches)
  (state1, losses1, c1), (state8, losses8, c8) = results['1'], results['8']
  assert c1 == 1 and c8 == 1
  np.testing.assert_allclose(losses8, losses1, rtol=1e-5, atol=1e-5)
  for key in ('params', 'target_params'):
    flat1 = jax.tree.leaves(jax.device_get(state1[key]))
    flat8 = jax.tree.leaves(jax.device_get(state8[key]))
    assert len(flat1) == len(flat8)
    for a, b in zip(flat1, flat8):
      np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-5)


def test_fsdp_actually_shards_large_params():
  config = tiny_config()
  config.mesh.data, config.mesh.fsdp = 4, 2
  mesh = sharding.make_mesh(sharding.MeshSpec.from_config(config))
  run = step_lib.setup(step_lib.StepSpec.from_config(config), mesh)
  state_shardings, abstract_state = run.state_shardings, run.abstract_state
  specs = jax.tree.leaves(jax.tree.map(lambda s: s.spec, state_shardings,
                                       is_leaf=lambda s: hasattr(s, 'spec')))
  sizes = [int(np.prod(a.shape)) for a in jax.tree.leaves(abstract_state)]
  sharded = [sp for sp, n in zip(specs, sizes) if 'fsdp' in tuple(sp)]
  assert sharded, 'no parameter is sharded over fsdp'
  for sp, n in zip(specs, sizes):
    if n >= sharding.FSDP_MIN_SIZE and 'fsdp' not in tuple(sp):
      pytest.fail(f'a large array ({n} elements) is not sharded: {sp}')


def test_ema_target_follows_formula_and_gets_no_gradient():
  config = tiny_config(total_steps=10)
  config.model.depth = 1  # One block shows the EMA; each block adds to two compiles.
  models = jepa.build_models(jepa.ModelSpec.from_config(config))
  adamw, length = optim.AdamW.from_config(config), optim.RunLength.from_config(config)
  total = length.total_steps
  schedules = optim.make_schedules(adamw, length)
  tx = optim.make_optimizer(adamw, schedules)
  step_fn = step_lib.make_train_step(step_lib.StepSpec.from_config(config), models, tx, schedules)
  jitted_step = jax.jit(step_fn)
  state = jax.jit(lambda: step_lib.init_state(models, tx, config.seed))()
  batch = jax.tree.map(jnp.asarray, fixed_batch(config))
  for _ in range(3):
    before = jax.device_get(state)
    state, metrics, _ = jitted_step(state, batch)
    after = jax.device_get(state)
    step = int(before['step'])
    m = config.optim.ema[0] + step * (config.optim.ema[1] - config.optim.ema[0]) / total
    np.testing.assert_allclose(float(metrics['ema_momentum']), m, rtol=1e-6)
    expected = jax.tree.map(lambda t, p: m * t + (1 - m) * p, before['target_params'],
                            after['params']['encoder'])
    for e, a in zip(jax.tree.leaves(expected), jax.tree.leaves(after['target_params'])):
      np.testing.assert_allclose(a, e, rtol=1e-6, atol=1e-7)
  # The optimizer state only covers the trained params: the target is not in it.
  opt_leaves = len(jax.tree.leaves(state['opt_state']))
  assert 'target_params' not in state['params']
  n_params = len(jax.tree.leaves(state['params']))
  assert opt_leaves >= 2 * n_params  # Adam's two moments, nothing for the target.
  # And the gradient of the loss with respect to the target parameters is exactly zero.

  def loss_of_target(target_params):
    return step_fn(dict(state, target_params=target_params), batch)[1]['loss']

  g = jax.jit(jax.grad(loss_of_target))(state['target_params'])  # Jitted: eager is minutes.
  assert all(float(jnp.max(jnp.abs(x))) == 0.0 for x in jax.tree.leaves(g))


def _rankme(x):
  """RankMe of `x [B, D]` in float64 numpy, with the step's epsilons."""
  s = np.linalg.svd(np.asarray(x, np.float64), compute_uv=False)
  p = s / (s.sum() + 1e-12) + 1e-7
  return float(np.exp(-np.sum(p * np.log(p))))


@pytest.mark.slow
def test_metrics_and_the_effective_rank_of_the_pooled_target_features_on_log_steps():
  # Log steps: every 3rd, every kNN evaluation (5th) and the last (7th); the others pay no SVD.
  config = tiny_config(vicreg_weight=0.001, total_steps=7)
  config.log_every_steps = 3
  config.evals.knn.every_steps = 5
  periods = evals_base.EvalsSpec.from_config(config).periods().values()
  assert [s for s in range(1, 8)
          if metrics_lib.is_log_step(s, config.log_every_steps, periods, 7)] == [3, 5, 6, 7]
  mesh = sharding.make_mesh(sharding.MeshSpec.from_config(config), jax.devices()[:1])
  run = step_lib.setup(step_lib.StepSpec.from_config(config), mesh)
  state = run.init_fn()
  batch = jax.device_put(fixed_batch(config), sharding.batch_sharding(mesh))
  for i in range(2):
    target_params = jax.device_get(state['target_params'])  # The step donates the state.
    state, metrics, pooled = run.jitted_step(state, batch)
    if i == 0:
      for key in ('loss', 'jepa', 'vicreg', 'vicreg_inv', 'vicreg_var', 'vicreg_cov', 'lr',
                  'weight_decay', 'ema_momentum', 'grad_norm', 'update_norm', 'param_norm',
                  'target_feature_std', 'finite'):
        assert key in metrics, key
      # The pooled target features [B, D] for the trainer's RankMe; the step has no log cadence.
      assert pooled.shape == (config.batch_size, 192) and 'target_effective_rank' not in metrics
      # Step 0's logged lr is the one its update used (the reference steps its scheduler first).
      expected_lr = float(optim.lr_schedule(optim.AdamW.from_config(config),
                                            optim.RunLength.from_config(config))(0))
      assert float(metrics['lr']) == pytest.approx(expected_lr, rel=1e-6)
      assert config.optim.start_lr < expected_lr < config.optim.lr
    rank = float(step_lib.effective_rank(pooled - jnp.mean(pooled, axis=0)))
    # RankMe of the centred, pooled, layer-normed target features the step used.
    h = run.models.encoder.apply({'params': target_params}, batch['image'])
    want = np.asarray(losses.normalize_targets(h), np.float64).mean(axis=1)
    np.testing.assert_allclose(np.asarray(pooled), want, rtol=1e-5, atol=1e-6)
    assert rank == pytest.approx(_rankme(want - want.mean(axis=0)), rel=1e-4)
    assert rank > 1.0
  assert run.trace_count[0] == 1


@pytest.mark.slow
def test_without_ema_the_state_keeps_no_target_copy_and_equals_momentum_zero():
  """use_ema=False: no `target_params` in the state (no second copy of the encoder); its steps
  equal those of EMA with momentum 0, whose target is always the online encoder."""
  batches = [fixed_batch(tiny_config(), seed=s) for s in range(3)]
  off = tiny_config(total_steps=4)
  off.use_ema = False
  zero = tiny_config(total_steps=4)
  zero.optim.ema = (0.0, 0.0)
  off.model.depth = zero.model.depth = 1  # One block shows it; each compile costs ~10 s.
  state_off, losses_off, _ = run_steps(off, jax.devices()[:1], 3, batches)
  state_zero, losses_zero, _ = run_steps(zero, jax.devices()[:1], 3, batches)
  assert 'target_params' not in state_off and 'target_params' in state_zero
  assert step_lib.target_encoder_params(state_off) is state_off['params']['encoder']
  np.testing.assert_allclose(losses_off, losses_zero, rtol=1e-6)
  for a, b in zip(jax.tree.leaves(state_off['params']), jax.tree.leaves(state_zero['params']),
                  strict=True):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-7)
  n_off = sum(x.size for x in jax.tree.leaves(state_off))
  n_zero = sum(x.size for x in jax.tree.leaves(state_zero))
  n_encoder = sum(x.size for x in jax.tree.leaves(state_zero['target_params']))
  assert n_zero - n_off == n_encoder


@pytest.mark.slow
def test_sigreg_objective_logs_its_term_and_trains():
  config = tiny_config(total_steps=4)
  config.model.depth = 1
  config.sigreg.weight = 0.05
  config.sigreg.num_slices = 16
  config.use_ema = False
  mesh = sharding.make_mesh(sharding.MeshSpec.from_config(config), jax.devices()[:1])
  run = step_lib.setup(step_lib.StepSpec.from_config(config), mesh)
  state = run.init_fn()
  _, metrics, _ = run.jitted_step(state, jax.device_put(fixed_batch(config),
                                                        sharding.batch_sharding(mesh)))
  assert 'ema_momentum' not in metrics and 'vicreg' not in metrics
  assert float(metrics['sigreg']) > 0 and np.isfinite(float(metrics['loss']))
  assert float(metrics['loss']) == pytest.approx(
      float(metrics['jepa']) + 0.05 * float(metrics['sigreg']), rel=1e-5)
