"""Gradient accumulation (`config.accum_steps`): one update per step from A micro-batches.

I-JEPA's loss is a mean over equally many valid tokens per image, so the accumulated step must
equal the full-batch step to float rounding; terms built on batch statistics (VICReg) are
computed per micro-batch and averaged, which this checks against an independent forward pass.
"""

import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cjepa_jax import config as config_lib
from cjepa_jax import losses
from cjepa_jax import masks as masks_lib
from cjepa_jax import sharding
from cjepa_jax import train_step as step_lib
from cjepa_jax.models import jepa

from test_train_step import fixed_batch
from test_train_step import tiny_config


def _run(config, devices, batches):
  """Steps `batches` from a fresh state: (final state, per-step metrics, pooled, compiles)."""
  mesh = sharding.make_mesh(sharding.MeshSpec.from_config(config), devices)
  run = step_lib.setup(step_lib.StepSpec.from_config(config), mesh)
  state = run.init_fn()
  out_metrics, out_pooled = [], []
  for batch in batches:
    state, metrics, pooled = run.jitted_step(
        state, jax.device_put(batch, sharding.batch_sharding(mesh)))
    out_metrics.append(jax.device_get(metrics))
    out_pooled.append(np.asarray(jax.device_get(pooled)))
  return jax.device_get(state), out_metrics, out_pooled, run.trace_count[0]


def _config(accum, **kw):
  config = tiny_config(total_steps=4, **kw)
  config.model.depth = 1
  config.optim.eps = 1e-6   # As in the sharding test: keeps Adam linear in near-zero gradients.
  config.accum_steps = accum
  return config


def _assert_trees_close(a, b, rtol=2e-5, atol=2e-6):
  la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
  assert len(la) == len(lb)
  for x, y in zip(la, lb):
    np.testing.assert_allclose(np.asarray(y), np.asarray(x), rtol=rtol, atol=atol)


def test_split_and_merge_micro_are_inverse_and_strided():
  x = jnp.arange(12 * 2).reshape(12, 2)
  micro = sharding.split_micro(x, 3)
  assert micro.shape == (3, 4, 2)
  # Micro-batch a holds rows a, A + a, 2A + a, ...: an equal share of every device's slice.
  np.testing.assert_array_equal(micro[1][:, 0], np.arange(1, 12, 3) * 2)
  np.testing.assert_array_equal(sharding.merge_micro(micro), x)


@pytest.mark.parametrize('accum', [4])
def test_ijepa_accumulated_step_equals_full_batch_step(accum):
  batches = [fixed_batch(_config(1), seed=s) for s in range(2)]
  full = _run(_config(1), jax.devices()[:1], batches)
  acc = _run(_config(accum), jax.devices()[:1], batches)
  assert full[3] == 1 and acc[3] == 1   # One compile each.
  for mf, ma in zip(full[1], acc[1]):
    for key in ('loss', 'jepa', 'grad_norm', 'update_norm', 'target_feature_std'):
      np.testing.assert_allclose(ma[key], mf[key], rtol=2e-5, err_msg=key)
  # The pooled target features come back in the batch's order.
  for pf, pa in zip(full[2], acc[2]):
    np.testing.assert_allclose(pa, pf, rtol=1e-5, atol=1e-6)
  # One optimizer and one EMA update per step: the same state after two steps.
  assert int(acc[0]['step']) == 2
  _assert_trees_close(full[0]['params'], acc[0]['params'])
  _assert_trees_close(full[0]['target_params'], acc[0]['target_params'])
  _assert_trees_close(full[0]['opt_state'], acc[0]['opt_state'], rtol=1e-4, atol=1e-9)


@pytest.mark.slow   # Two compiles, one of them on 8 devices; the exactness check stays fast.
def test_accumulated_sharded_equals_single_device():
  assert jax.device_count() == 8, 'conftest sets 8 fake CPU devices'
  batches = [fixed_batch(_config(2), seed=s) for s in range(2)]
  single = _run(_config(2), jax.devices()[:1], batches)
  config = _config(2)
  config.mesh.data, config.mesh.fsdp = 2, 4   # batch 16 = 8 shards x 2 micro-batches.
  sharded = _run(config, jax.devices(), batches)
  assert sharded[3] == 1
  for m1, m8 in zip(single[1], sharded[1]):
    np.testing.assert_allclose(m8['loss'], m1['loss'], rtol=1e-5)
  _assert_trees_close(single[0]['params'], sharded[0]['params'], rtol=1e-5, atol=1e-5)


def _reference_micro_losses(config, state, batch, accum):
  """Each micro-batch's C-JEPA loss, computed outside the step from the step's own masks."""
  models = jepa.build_models(jepa.ModelSpec.from_config(config))
  images = jnp.asarray(batch['image'])
  step_key = jax.random.fold_in(state['rng'], state['step'])
  m = jax.jit(masks_lib.sample_masks, static_argnums=(1, 2))(
      step_key, images.shape[0], models.mask_spec)
  spec = losses.VICRegSpec.from_config(config.vicreg)

  @jax.jit   # One compile for the 4 equally shaped micro-batches (eager would compile each op).
  def micro_loss(x, mm):
    h = losses.normalize_targets(models.encoder.apply({'params': state['target_params']}, x))
    z = models.encoder.apply({'params': state['params']['encoder']}, x, mm.ctx_idx,
                             mm.ctx_valid)
    pred = models.predictor.apply({'params': state['params']['predictor']}, z, mm.ctx_idx,
                                  mm.ctx_valid, mm.tgt_idx, mm.tgt_valid)
    loss, _ = losses.cjepa_loss(pred, losses.gather_tokens(h, mm.tgt_idx), mm.tgt_valid,
                                ctx=z, ctx_valid=mm.ctx_valid, kind=config.loss.kind,
                                vicreg=spec)
    return loss

  out = []
  for a in range(accum):
    rows = np.arange(a, images.shape[0], accum)   # The strided split of `split_micro`.
    out.append(float(micro_loss(images[rows], jax.tree.map(lambda t, rows=rows: t[rows], m))))
  return np.array(out, np.float64)


def test_vicreg_accumulation_averages_per_micro_batch_losses():
  accum = 4
  config = _config(accum, vicreg_weight=0.5)
  batch = fixed_batch(config)
  mesh = sharding.make_mesh(sharding.MeshSpec.from_config(config), jax.devices()[:1])
  run = step_lib.setup(step_lib.StepSpec.from_config(config), mesh)
  state = run.init_fn()
  before = jax.device_get(state)
  _, metrics, _ = run.jitted_step(state, jax.device_put(batch, sharding.batch_sharding(mesh)))
  micro = _reference_micro_losses(config, before, batch, accum)
  np.testing.assert_allclose(float(metrics['loss']), micro.mean(), rtol=1e-5)
  # ... which is not the full-batch objective: the variance / covariance see 4 images, not 16.
  full = _run(_config(1, vicreg_weight=0.5), jax.devices()[:1], [batch])[1][0]
  assert abs(float(full['loss']) - micro.mean()) > 1e-3


def test_batch_statistics_warning_once_and_bad_values(caplog):
  config = _config(2, vicreg_weight=0.5)
  mesh = sharding.make_mesh(sharding.MeshSpec.from_config(config), jax.devices()[:1])
  with caplog.at_level(logging.WARNING):
    step_lib.setup(step_lib.StepSpec.from_config(config), mesh)
  warned = [r for r in caplog.records if 'accum_steps=2 with VICReg' in r.getMessage()]
  assert len(warned) == 1
  caplog.clear()
  with caplog.at_level(logging.WARNING):
    # Plain I-JEPA: exact, nothing to warn about.
    step_lib.setup(step_lib.StepSpec.from_config(_config(2)), mesh)
  assert not [r for r in caplog.records if 'accum_steps' in r.getMessage()]

  bad = _config(3)   # 16 images do not split into 3 micro-batches.
  with pytest.raises(ValueError, match=r'accum_steps=3 .*multiple of 3'):
    step_lib.setup(step_lib.StepSpec.from_config(bad), mesh)
  zero = _config(1)
  zero.accum_steps = 0
  with pytest.raises(ValueError, match=r'config\.accum_steps=0 is invalid'):
    config_lib.validate(zero)
