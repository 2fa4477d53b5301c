"""Tests for cjepa_jax/losses.py and the VICReg projector, against float64 numpy references.

Everything runs under jit, as in training (and because eager op-by-op dispatch is slow on CPU).
"""

import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from cjepa_jax import losses
from cjepa_jax.models import projector as projector_lib

RTOL = 2e-5
ATOL = 1e-6

normalize_targets = jax.jit(losses.normalize_targets)
gather_tokens = jax.jit(losses.gather_tokens)
jepa_loss = jax.jit(losses.jepa_loss, static_argnames='kind')
pool_tokens = jax.jit(losses.pool_tokens)
pool_blocks = jax.jit(losses.pool_blocks)
vicreg_variance = jax.jit(losses.vicreg_variance)
vicreg_covariance = jax.jit(losses.vicreg_covariance)
vicreg_invariance = jax.jit(losses.vicreg_invariance)


def cjepa_loss(*args, vicreg, kind='smooth_l1', **kwargs):
  spec = losses.VICRegSpec.from_config(vicreg)  # The config's values, resolved as the step does.
  return jax.jit(functools.partial(losses.cjepa_loss, vicreg=spec, kind=kind))(*args, **kwargs)


# ----------------------------------------- numpy references (float64, written independently)


def np_layer_norm(h, eps=1e-5):
  h = np.asarray(h, np.float64)
  mu = h.mean(-1, keepdims=True)
  var = ((h - mu) ** 2).mean(-1, keepdims=True)
  return (h - mu) / np.sqrt(var + eps)


def np_elementwise(pred, target, kind):
  d = np.asarray(pred, np.float64) - np.asarray(target, np.float64)
  if kind == 'smooth_l1':
    return np.where(np.abs(d) < 1.0, 0.5 * d * d, np.abs(d) - 0.5)
  return d * d


def np_jepa(pred, target, valid, kind):
  """Mean over the valid tokens (selected, not masked) and all dims."""
  err = np_elementwise(pred, target, kind)  # [B, M, K, D]
  return err[np.asarray(valid)].mean()


def np_var_term(x):
  x = np.asarray(x, np.float64)
  std = np.sqrt(x.var(axis=0, ddof=1) + 1e-4)
  return np.maximum(0.0, 1.0 - std).mean()


def np_cov_term(x):
  x = np.asarray(x, np.float64)
  n, d = x.shape
  xc = x - x.mean(0)
  c = xc.T @ xc / (n - 1)
  off = c[~np.eye(d, dtype=bool)]
  return (off ** 2).sum() / d


def np_inv_term(x, y):
  return ((np.asarray(x, np.float64) - np.asarray(y, np.float64)) ** 2).mean()


def np_official_vicreg_pair(x, y):
  """(inv, var, cov) exactly as official VICReg's forward for one pair of branches."""
  return (np_inv_term(x, y), np_var_term(x) / 2 + np_var_term(y) / 2,
          np_cov_term(x) + np_cov_term(y))


# ----------------------------------------- fixtures


def _data(b=6, m=3, k=5, d=8, seed=0):
  rng = np.random.default_rng(seed)
  pred = (2.0 * rng.normal(size=(b, m, k, d))).astype(np.float32)  # |diff| on both sides of 1.
  target = rng.normal(size=(b, m, k, d)).astype(np.float32)
  valid = rng.random((b, m, k)) < 0.7
  valid[:, :, 0] = True  # Every block has a token.
  return pred, target, valid


VIC = dict(weight=0.001, mode='context', sim_coeff=25.0, std_coeff=25.0, cov_coeff=1.0)


# ----------------------------------------- I-JEPA terms


def test_normalize_targets_matches_torch_layer_norm_formula():
  h = np.random.default_rng(1).normal(3.0, 2.0, size=(2, 7, 16)).astype(np.float32)
  out = normalize_targets(jnp.asarray(h))
  assert out.dtype == jnp.float32 and out.shape == h.shape
  np.testing.assert_allclose(out, np_layer_norm(h), rtol=RTOL, atol=1e-5)
  # Constant rows: eps 1e-5 keeps them finite, exactly 0.
  np.testing.assert_array_equal(normalize_targets(jnp.ones((1, 2, 4))), 0.0)


def test_gather_tokens():
  rng = np.random.default_rng(2)
  h = rng.normal(size=(3, 10, 4)).astype(np.float32)
  idx = rng.integers(0, 10, size=(3, 2, 5))
  out = gather_tokens(jnp.asarray(h), jnp.asarray(idx))
  assert out.shape == (3, 2, 5, 4)
  want = np.stack([h[b][idx[b]] for b in range(3)])
  np.testing.assert_array_equal(out, want)
  with pytest.raises(ValueError, match='idx'):
    gather_tokens(jnp.asarray(h), jnp.asarray(idx[0]))


@pytest.mark.parametrize('kind', ['smooth_l1', 'l2'])
def test_jepa_loss_matches_numpy(kind):
  pred, target, valid = _data()
  got = jepa_loss(jnp.asarray(pred), jnp.asarray(target), jnp.asarray(valid), kind)
  assert got.dtype == jnp.float32 and got.shape == ()
  np.testing.assert_allclose(got, np_jepa(pred, target, valid, kind), rtol=RTOL)


def test_jepa_loss_all_valid_is_plain_mean_of_reference():
  # The reference's F.smooth_l1_loss(z, h): plain mean over every element of equal-size blocks.
  pred, target, _ = _data(seed=3)
  valid = np.ones(pred.shape[:3], bool)
  got = jepa_loss(jnp.asarray(pred), jnp.asarray(target), jnp.asarray(valid))
  np.testing.assert_allclose(got, np_elementwise(pred, target, 'smooth_l1').mean(), rtol=RTOL)


def test_padding_garbage_changes_nothing_value_or_grad():
  pred, target, valid = _data(seed=4)
  dirty_pred, dirty_target = pred.copy(), target.copy()
  pad = ~valid
  dirty_pred[pad] = np.nan
  dirty_target[pad] = np.inf
  dirty_target[pad, 0] = -np.inf

  def f(p, t):
    return jepa_loss(p, t, jnp.asarray(valid))

  vg = jax.jit(jax.value_and_grad(f))
  clean_v, clean_g = vg(jnp.asarray(pred), jnp.asarray(target))
  dirty_v, dirty_g = vg(jnp.asarray(dirty_pred), jnp.asarray(dirty_target))
  np.testing.assert_array_equal(dirty_v, clean_v)
  assert np.all(np.isfinite(dirty_g))
  np.testing.assert_array_equal(dirty_g, clean_g)
  np.testing.assert_array_equal(np.asarray(dirty_g)[pad], 0.0)
  # Pooling too.
  pooled = pool_blocks(jnp.asarray(dirty_pred), jnp.asarray(valid))
  np.testing.assert_array_equal(pooled, pool_blocks(jnp.asarray(pred), jnp.asarray(valid)))


def test_pooling_matches_numpy():
  pred, _, valid = _data(seed=5)
  got = pool_blocks(jnp.asarray(pred), jnp.asarray(valid))
  want = np.array([[pred[b, m][valid[b, m]].astype(np.float64).mean(0) for m in range(3)]
                   for b in range(6)])
  np.testing.assert_allclose(got, want, rtol=RTOL, atol=ATOL)
  got_t = pool_tokens(jnp.asarray(pred[:, 1]), jnp.asarray(valid[:, 1]))
  np.testing.assert_allclose(got_t, want[:, 1], rtol=RTOL, atol=ATOL)
  # All-invalid rows pool to 0, not NaN.
  np.testing.assert_array_equal(
      pool_tokens(jnp.ones((2, 3, 4)), jnp.zeros((2, 3), bool)), 0.0)


# ----------------------------------------- VICReg terms


def test_vicreg_terms_match_numpy():
  rng = np.random.default_rng(6)
  x = (rng.normal(size=(12, 6)) * rng.uniform(0.2, 2.0, size=6)).astype(np.float32)
  x[:, 1] += 0.5 * x[:, 0]  # Correlated columns, so the covariance term is far from 0.
  y = rng.normal(size=(12, 6)).astype(np.float32)
  np.testing.assert_allclose(vicreg_variance(jnp.asarray(x)), np_var_term(x), rtol=RTOL)
  np.testing.assert_allclose(vicreg_covariance(jnp.asarray(x)), np_cov_term(x), rtol=RTOL)
  np.testing.assert_allclose(vicreg_invariance(jnp.asarray(x), jnp.asarray(y)),
                             np_inv_term(x, y), rtol=RTOL)
  assert np_var_term(x) > 0.05 and np_cov_term(x) > 0.05  # Non-trivial cases.
  # A row mask is the same as the subset.
  keep = rng.random(12) < 0.6
  v = jnp.asarray(keep)
  np.testing.assert_allclose(vicreg_variance(jnp.asarray(x), v), np_var_term(x[keep]),
                             rtol=RTOL)
  np.testing.assert_allclose(vicreg_covariance(jnp.asarray(x), v), np_cov_term(x[keep]),
                             rtol=RTOL)
  np.testing.assert_allclose(vicreg_invariance(jnp.asarray(x), jnp.asarray(y), v),
                             np_inv_term(x[keep], y[keep]), rtol=RTOL)
  # NaN in dropped rows: same values, finite gradients.
  dirty = np.where(keep[:, None], x, np.nan).astype(np.float32)
  terms = lambda a: (losses.vicreg_variance(a, v) + losses.vicreg_covariance(a, v)  # noqa: E731
                     + losses.vicreg_invariance(a, jnp.asarray(y), v))
  val, grad = jax.jit(jax.value_and_grad(terms))(jnp.asarray(dirty))
  np.testing.assert_allclose(
      val, np_var_term(x[keep]) + np_cov_term(x[keep]) + np_inv_term(x[keep], y[keep]), rtol=RTOL)
  assert np.all(np.isfinite(grad)) and np.all(np.asarray(grad)[~keep] == 0.0)


def test_vicreg_invariants_on_decorrelated_data():
  # Hadamard 8x8 without its all-ones column: zero-mean, mutually orthogonal columns.
  h = np.array([[1.0]])
  for _ in range(3):
    h = np.block([[h, h], [h, -h]])
  x = 3.0 * h[:, 1:]  # std = 3 * sqrt(8/7) >= 1 in every dim.
  np.testing.assert_allclose(vicreg_covariance(jnp.asarray(x)), 0.0, atol=1e-6)
  assert float(vicreg_variance(jnp.asarray(x))) == 0.0
  # Collapsed embeddings: every std is sqrt(1e-4), the variance term is 1 - 0.01.
  np.testing.assert_allclose(vicreg_variance(jnp.ones((8, 5))), 0.99, rtol=1e-6)


def test_vicreg_statistics_are_global_under_sharding():
  devices = np.array(jax.devices())
  mesh = Mesh(devices, ('data',))
  x = np.random.default_rng(7).normal(size=(4 * len(devices), 6)).astype(np.float32)
  xs = jax.device_put(x, NamedSharding(mesh, P('data')))
  f = jax.jit(lambda a: (vicreg_variance(a), vicreg_covariance(a)))
  var, cov = f(xs)
  np.testing.assert_allclose(var, np_var_term(x), rtol=RTOL)
  np.testing.assert_allclose(cov, np_cov_term(x), rtol=RTOL)


# ----------------------------------------- cjepa_loss


def test_context_mode_total_matches_numpy():
  pred, target, valid = _data(seed=8)
  rng = np.random.default_rng(8)
  ctx = rng.normal(size=(6, 7, 8)).astype(np.float32)
  ctx_valid = rng.random((6, 7)) < 0.8
  ctx_valid[:, 0] = True
  loss, m = cjepa_loss(jnp.asarray(pred), jnp.asarray(target), jnp.asarray(valid),
                              ctx=jnp.asarray(ctx), ctx_valid=jnp.asarray(ctx_valid), vicreg=VIC)
  z = np.stack([ctx[b][ctx_valid[b]].astype(np.float64).mean(0) for b in range(6)])
  jepa = np_jepa(pred, target, valid, 'smooth_l1')
  inv = np_jepa(pred, target, valid, 'l2')
  var, cov = np_var_term(z), np_cov_term(z)
  vic = 25 * inv + 25 * var + 1 * cov
  for key, want in [('jepa', jepa), ('vicreg_inv', inv), ('vicreg_var', var),
                    ('vicreg_cov', cov), ('vicreg', vic), ('loss', jepa + 0.001 * vic)]:
    np.testing.assert_allclose(m[key], want, rtol=RTOL, err_msg=key)
  np.testing.assert_array_equal(loss, m['loss'])
  assert set(m) == {'loss', 'jepa', 'vicreg', 'vicreg_inv', 'vicreg_var', 'vicreg_cov'}


def test_blocks_mode_total_matches_official_vicreg_per_pair():
  pred, target, valid = _data(b=10, m=4, seed=9)
  emb = np.random.default_rng(9).normal(size=(10, 4, 6)).astype(np.float32)
  emb[:, 2] *= 0.3  # One block with small std, so the variance term is active.
  cfg = dict(VIC, mode='blocks', weight=0.01)
  loss, m = cjepa_loss(jnp.asarray(pred), jnp.asarray(target), jnp.asarray(valid),
                              block_embeddings=jnp.asarray(emb), vicreg=cfg)
  pairs = [np_official_vicreg_pair(emb[:, i], emb[:, j])
           for i, j in itertools.combinations(range(4), 2)]
  inv, var, cov = np.mean(pairs, axis=0)
  vic = 25 * inv + 25 * var + cov
  jepa = np_jepa(pred, target, valid, 'smooth_l1')
  np.testing.assert_allclose(m['vicreg_inv'], inv, rtol=RTOL)
  np.testing.assert_allclose(m['vicreg_var'], var, rtol=RTOL)
  np.testing.assert_allclose(m['vicreg_cov'], cov, rtol=RTOL)
  np.testing.assert_allclose(loss, jepa + 0.01 * vic, rtol=RTOL)
  # Invalid blocks drop out of the pairs they are in.
  bv = np.ones((10, 4), bool)
  bv[:3, 1] = False
  _, m2 = cjepa_loss(jnp.asarray(pred), jnp.asarray(target), jnp.asarray(valid),
                            block_embeddings=jnp.asarray(emb), block_valid=jnp.asarray(bv),
                            vicreg=cfg)
  inv2 = np.mean([np_inv_term(emb[bv[:, i] & bv[:, j], i], emb[bv[:, i] & bv[:, j], j])
                  for i, j in itertools.combinations(range(4), 2)])
  var2 = np.mean([np_var_term(emb[bv[:, i], i]) for i in range(4)])
  np.testing.assert_allclose(m2['vicreg_inv'], inv2, rtol=RTOL)
  np.testing.assert_allclose(m2['vicreg_var'], var2, rtol=RTOL)


def test_weight_zero_is_exactly_ijepa():
  pred, target, valid = _data(seed=10)
  args = (jnp.asarray(pred), jnp.asarray(target), jnp.asarray(valid))
  jepa = jepa_loss(*args)
  # NaN context: the logged terms are NaN, the loss is untouched.
  ctx = jnp.full((6, 3, 8), jnp.nan)
  loss, m = cjepa_loss(*args, ctx=ctx, vicreg=dict(VIC, weight=0.0))
  np.testing.assert_array_equal(loss, jepa)
  assert np.isnan(m['vicreg_var'])
  grad_c = jax.jit(jax.grad(
      lambda p: cjepa_loss(p, *args[1:], ctx=ctx, vicreg=dict(VIC, weight=0.0))[0]))
  grad_j = jax.jit(jax.grad(lambda p: jepa_loss(p, *args[1:])))
  np.testing.assert_array_equal(grad_c(args[0]), grad_j(args[0]))
  # Blocks mode without embeddings: zeros logged.
  loss, m = cjepa_loss(*args, vicreg=dict(VIC, weight=0.0, mode='blocks'))
  np.testing.assert_array_equal(loss, jepa)
  assert float(m['vicreg']) == 0.0


def test_bfloat16_inputs_are_computed_in_float32():
  pred, target, valid = _data(seed=11)
  ctx = np.random.default_rng(11).normal(size=(6, 7, 8)).astype(np.float32)
  bf = lambda a: jnp.asarray(a, jnp.bfloat16)  # noqa: E731
  f32 = lambda a: np.asarray(bf(a).astype(jnp.float32))  # noqa: E731  The rounded values.
  loss, m = cjepa_loss(bf(pred), bf(target), jnp.asarray(valid), ctx=bf(ctx), vicreg=VIC)
  assert all(v.dtype == jnp.float32 for v in m.values())
  z = f32(ctx).astype(np.float64).mean(1)
  np.testing.assert_allclose(m['jepa'], np_jepa(f32(pred), f32(target), valid, 'smooth_l1'),
                             rtol=RTOL)
  np.testing.assert_allclose(m['vicreg_cov'], np_cov_term(z), rtol=RTOL)
  np.testing.assert_allclose(m['vicreg_var'], np_var_term(z), rtol=RTOL)
  assert normalize_targets(bf(ctx)).dtype == jnp.float32


def test_bad_inputs_raise_clear_errors():
  pred, target, valid = _data(m=1, seed=12)
  args = (jnp.asarray(pred), jnp.asarray(target), jnp.asarray(valid))
  with pytest.raises(ValueError, match='vicreg.mode'):
    cjepa_loss(*args, vicreg=dict(VIC, mode='both'))
  with pytest.raises(ValueError, match='loss kind'):
    cjepa_loss(*args, kind='l1', vicreg=dict(VIC, weight=0.0))
  with pytest.raises(ValueError, match='needs ctx'):
    cjepa_loss(*args, vicreg=VIC)
  with pytest.raises(ValueError, match='needs block_embeddings'):
    cjepa_loss(*args, vicreg=dict(VIC, mode='blocks'))
  with pytest.raises(ValueError, match='at least 2 target blocks'):
    cjepa_loss(*args, block_embeddings=jnp.ones((6, 1, 4)),
                      vicreg=dict(VIC, mode='blocks'))
  with pytest.raises(ValueError, match='lacks key'):
    cjepa_loss(*args, vicreg={'mode': 'context'})


def test_config_dict_is_accepted():
  from cjepa_jax import config as config_lib
  c = config_lib.default_config()
  pred, target, valid = _data(seed=13)
  loss, _ = cjepa_loss(jnp.asarray(pred), jnp.asarray(target), jnp.asarray(valid),
                              kind=c.loss.kind, vicreg=c.vicreg)
  np.testing.assert_allclose(loss, np_jepa(pred, target, valid, 'smooth_l1'), rtol=RTOL)


# ----------------------------------------- projector


def np_projector(params, x, valid, spec_len):
  x = np.asarray(x, np.float64)
  for i in range(spec_len - 1):
    d = params[f'dense_{i}']
    # Official VICReg has a bias here; BatchNorm cancels it exactly, so ours has none.
    x = x @ np.asarray(d['kernel'], np.float64) + np.asarray(d.get('bias', 0.0), np.float64)
    rows = x[valid]
    mu, var = rows.mean(0), rows.var(0)  # Biased, as torch BatchNorm in training.
    n = params[f'norm_{i}']
    x = (x - mu) / np.sqrt(var + 1e-5) * np.asarray(n['scale']) + np.asarray(n['bias'])
    x = np.maximum(x, 0.0)
  return x @ np.asarray(params[f'dense_{spec_len - 1}']['kernel'], np.float64)


def test_projector_matches_numpy_batchnorm_mlp():
  model = projector_lib.Projector(spec='16-16-12')
  rng = np.random.default_rng(14)
  x = rng.normal(size=(5, 4, 8)).astype(np.float32)
  valid = rng.random((5, 4)) < 0.7
  # The 'rbg' key compiles much faster than threefry on CPU.
  params = jax.jit(model.init)(jax.random.key(0, impl='rbg'), jnp.asarray(x))['params']
  # Perturb the BN affine params so they are exercised.
  def perturb(path, a):
    a = np.asarray(a)
    if path[-1].key in ('scale', 'bias'):
      a = a + 0.1 * (np.arange(a.size).reshape(a.shape) % 3)
    return a
  params = jax.tree_util.tree_map_with_path(perturb, params)
  assert 'bias' not in params['dense_2']  # Last layer without bias, as official VICReg.
  assert 'bias' not in params['dense_0']  # Cancelled by the BatchNorm that follows.
  bound = 1 / np.sqrt(8)
  assert np.abs(params['dense_0']['kernel']).max() <= bound  # torch Linear default init.
  out = jax.jit(model.apply)({'params': params}, jnp.asarray(x), jnp.asarray(valid))
  assert out.shape == (5, 4, 12) and out.dtype == jnp.float32
  want = np_projector(params, x, valid, 3)
  np.testing.assert_allclose(np.asarray(out)[valid], want[valid], rtol=1e-4, atol=1e-5)


def test_projector_bad_spec():
  with pytest.raises(ValueError, match='projector spec'):
    projector_lib.Projector(spec='2048-x').init(jax.random.key(0), jnp.ones((2, 4)))
  with pytest.raises(ValueError, match='projector norm'):
    projector_lib.Projector(spec='8', norm='group').init(jax.random.key(0), jnp.ones((2, 4)))


# ------------------------------------------------------------------------------------------------
# SIGReg (LeJEPA): the Epps-Pulley statistic of random 1-D projections.
# ------------------------------------------------------------------------------------------------


def epps_pulley_numpy(x, t_max=3.0, knots=17):
  """float64, the whole symmetric grid [-t_max, t_max] (2 * knots - 1 points), complex ECF and
  the plain trapezoid rule: N * integral |ecf(t) - phi(t)|^2 phi(t) dt, per column of x [N, K]."""
  x = np.asarray(x, np.float64)
  t = np.linspace(-t_max, t_max, 2 * knots - 1)
  phi = np.exp(-0.5 * t**2)
  ecf = np.exp(1j * x[..., None] * t).mean(axis=0)                       # [K, T]
  integrand = np.abs(ecf - phi) ** 2 * phi
  dt = t[1] - t[0]
  return x.shape[0] * dt * (integrand.sum(-1) - 0.5 * (integrand[:, 0] + integrand[:, -1]))


def test_epps_pulley_matches_numpy():
  rng = np.random.default_rng(0)
  x = np.concatenate([rng.normal(size=(300, 2)), rng.uniform(-2, 2, size=(300, 1)),
                      rng.exponential(size=(300, 1))], axis=1).astype(np.float32)
  for t_max, knots in ((3.0, 17), (5.0, 21)):
    got = jax.jit(losses.epps_pulley, static_argnums=(1, 2))(x, t_max, knots)
    np.testing.assert_allclose(np.asarray(got), epps_pulley_numpy(x, t_max, knots), rtol=1e-4)


def test_sigreg_is_the_mean_over_unit_random_directions():
  z = np.random.default_rng(1).normal(size=(128, 24)).astype(np.float32) * 1.5
  spec = losses.SIGRegSpec(weight=1.0, num_slices=32)
  key = jax.random.key(7)
  got = float(jax.jit(losses.sigreg, static_argnums=2)(z, key, spec))
  a = np.asarray(jax.random.normal(key, (24, 32), jnp.float32), np.float64)
  a /= np.linalg.norm(a, axis=0, keepdims=True)
  np.testing.assert_allclose(got, epps_pulley_numpy(z @ a).mean(), rtol=1e-4)
  # Another key, other directions; the same key, the same value (every device draws the same).
  assert float(losses.sigreg(z, jax.random.key(8), spec)) != got
  assert float(losses.sigreg(z, key, spec)) == pytest.approx(got, rel=1e-6)


def test_sigreg_small_on_gaussians_large_on_collapse_and_scale():
  spec = losses.SIGRegSpec(weight=1.0, num_slices=256)
  z = jax.random.normal(jax.random.key(0), (4096, 64))
  null = losses.epps_pulley_null_mean()
  gaussian = float(losses.sigreg(z, jax.random.key(1), spec))
  assert abs(gaussian - null) < 0.1 * null, (gaussian, null)   # E[EP] under H0, whatever N.
  collapsed = float(losses.sigreg(jnp.ones_like(z) * 0.3, jax.random.key(1), spec))
  scaled = float(losses.sigreg(3.0 * z, jax.random.key(1), spec))
  low_rank = float(losses.sigreg(z[:, :2] @ jnp.ones((2, 64)), jax.random.key(1), spec))
  for bad in (collapsed, scaled, low_rank):
    assert bad > 50 * null, (bad, null)


def test_sigreg_gradient_is_finite_and_pushes_towards_the_gaussian():
  spec = losses.SIGRegSpec(weight=1.0, num_slices=64)
  for z in (jnp.zeros((64, 16)), 0.01 * jax.random.normal(jax.random.key(2), (64, 16)),
            jax.random.normal(jax.random.key(3), (64, 16))):
    g = jax.grad(losses.sigreg)(z, jax.random.key(4), spec)
    assert np.all(np.isfinite(np.asarray(g)))
  # A step down the gradient from a too-narrow cloud widens it and lowers the statistic.
  z = 0.1 * jax.random.normal(jax.random.key(5), (256, 16))
  f = lambda z: losses.sigreg(z, jax.random.key(6), spec)
  g = jax.grad(f)(z)
  assert float(f(z - 0.5 * g / jnp.linalg.norm(g) * jnp.sqrt(z.size))) < float(f(z))


def test_sigreg_sharded_equals_single_device():
  assert jax.device_count() == 8
  z = np.random.default_rng(9).normal(size=(64, 32)).astype(np.float32)
  spec = losses.SIGRegSpec(weight=1.0, num_slices=16)
  fn = jax.jit(losses.sigreg, static_argnums=2)
  one = fn(jax.device_put(z, jax.devices()[0]), jax.random.key(3), spec)
  mesh = Mesh(np.asarray(jax.devices()), ('data',))
  eight = fn(jax.device_put(z, NamedSharding(mesh, P('data'))), jax.random.key(3), spec)
  np.testing.assert_allclose(float(eight), float(one), rtol=1e-5)


def test_cjepa_loss_adds_weighted_sigreg_of_the_pooled_context():
  rng = np.random.default_rng(4)
  pred = rng.normal(size=(8, 2, 3, 16)).astype(np.float32)
  target = rng.normal(size=(8, 2, 3, 16)).astype(np.float32)
  valid = np.ones((8, 2, 3), bool)
  ctx = rng.normal(size=(8, 5, 16)).astype(np.float32)
  ctx_valid = np.ones((8, 5), bool)
  ctx_valid[:, 4] = False
  ctx[:, 4] = np.nan   # Padding never reaches the statistic.
  vic = losses.VICRegSpec(0.0, 'context', 25.0, 25.0, 1.0)
  spec = losses.SIGRegSpec(weight=0.3, num_slices=8)
  key = jax.random.key(0)
  loss, terms = losses.cjepa_loss(pred, target, valid, ctx=ctx, ctx_valid=ctx_valid, vicreg=vic,
                                  sigreg_spec=spec, sigreg_key=key)
  want = float(losses.sigreg(ctx[:, :4].mean(1), key, spec))
  assert float(terms['sigreg']) == pytest.approx(want, rel=1e-5)
  assert float(loss) == pytest.approx(float(terms['jepa']) + 0.3 * want, rel=1e-5)
  _, off = losses.cjepa_loss(pred, target, valid, ctx=ctx, ctx_valid=ctx_valid, vicreg=vic)
  assert 'sigreg' not in off
