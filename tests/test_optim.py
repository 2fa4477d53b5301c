"""Tests for cjepa_jax/optim.py: schedules vs the reference formulas, decay mask, AdamW, EMA."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from cjepa_jax import config as config_lib
from cjepa_jax import optim


def small_config(epochs=10, spe=10, warmup_epochs=2.0, **overrides):
  c = config_lib.default_config()
  c.batch_size = 8
  c.data.num_train_examples = 8 * spe + 5  # The partial last batch is dropped.
  c.epochs = epochs
  c.optim.warmup_epochs = warmup_epochs
  c.update_from_flattened_dict(overrides)  # Dotted keys, e.g. 'model.depth'.
  return c


# ----------------------------------------- the reference's formulas, written from its docs


def ref_lr(s, warmup, t_max, start, ref, final):
  """WarmupCosineSchedule value at its internal step s (s = 1 at the first optimizer step)."""
  if s < warmup:
    return start + s / max(1, warmup) * (ref - start)
  progress = (s - warmup) / max(1, t_max - warmup)
  return max(final, final + (ref - final) * 0.5 * (1 + math.cos(math.pi * progress)))


def ref_wd(s, t_max, ref, final):
  new = final + (ref - final) * 0.5 * (1 + math.cos(math.pi * s / t_max))
  return max(final, new) if final <= ref else min(final, new)


def ref_momentum(i, t, ipe_scale, m0=0.996, m1=1.0):
  return m0 + i * (m1 - m0) / (t * ipe_scale)


def specs(c):
  """The optimizer's and the run length's specs, as the trainer reads them from `c`."""
  return optim.AdamW.from_config(c), optim.RunLength.from_config(c)


def run_length(c):
  length = optim.RunLength.from_config(c)
  return length.total_steps, length.steps_per_epoch


def values(schedule, n):
  return np.asarray(jax.jit(jax.vmap(schedule))(jnp.arange(n)), np.float64)


# ----------------------------------------- run length and warmup


def test_run_length_and_warmup():
  c = small_config()
  assert run_length(c) == (100, 10)
  assert optim.warmup_steps(*specs(c)) == 20  # int(2 epochs * 10).
  c.optim.warmup_epochs = 1.55
  assert optim.warmup_steps(*specs(c)) == 15  # Truncated, as the reference's int().
  # Explicit total_steps: the warmup keeps its fraction of the run (2/10 of 30).
  c = small_config(total_steps=30)
  assert run_length(c) == (30, 10)
  assert optim.warmup_steps(*specs(c)) == 6
  c.optim.warmup_steps = 7
  assert optim.warmup_steps(*specs(c)) == 7
  c.optim.warmup_steps = 70
  assert optim.warmup_steps(*specs(c)) == 30  # Capped at the run.
  c = small_config()
  c.data.num_train_examples = 3
  assert run_length(c) == (10, 1)  # At least one step per epoch.
  c = small_config(epochs=0)
  with pytest.raises(ValueError, match='total_steps'):
    run_length(c)


# ----------------------------------------- schedules


def test_lr_schedule_matches_reference_and_closed_forms():
  c = small_config()
  sched = optim.lr_schedule(*specs(c))
  got = values(sched, 130)
  start, ref, final, w, t = 2e-4, 1e-3, 1e-6, 20, 100
  want = np.array([ref_lr(k + 1, w, t, start, ref, final) for k in range(100)])
  np.testing.assert_allclose(got[:100], want, rtol=1e-5)
  # Closed forms at the landmarks (k is the 0-based optimizer step, reference step k + 1).
  np.testing.assert_allclose(got[0], start + (ref - start) / w, rtol=1e-6)  # First update.
  np.testing.assert_allclose(got[w - 1], ref, rtol=1e-6)  # End of warmup.
  np.testing.assert_allclose(got[w - 1 + (t - w) // 2], (ref + final) / 2, rtol=1e-6)
  np.testing.assert_allclose(got[t - 1], final, rtol=1e-5)  # Last update of the run.
  np.testing.assert_allclose(got[100:], final, rtol=1e-5)  # Held past the end.
  assert np.all(np.diff(got[:w]) > 0) and np.all(np.diff(got[w - 1:t]) < 0)


def test_lr_schedule_ipe_scale_and_no_warmup():
  c = small_config(ipe_scale=1.25, warmup_epochs=0.0)
  got = values(optim.lr_schedule(*specs(c)), 100)
  want = [ref_lr(k + 1, 0, 125, 2e-4, 1e-3, 1e-6) for k in range(100)]
  np.testing.assert_allclose(got, want, rtol=1e-5)
  # Stretched: the run ends at cosine progress 100/125, well above final_lr, as the reference.
  np.testing.assert_allclose(got[-1], 1e-6 + (1e-3 - 1e-6) * 0.5 * (1 + math.cos(0.8 * math.pi)),
                             rtol=1e-5)


def test_wd_schedule():
  c = small_config()
  got = values(optim.wd_schedule(*specs(c)), 120)
  want = [ref_wd(k + 1, 100, 0.04, 0.4) for k in range(100)]
  np.testing.assert_allclose(got[:100], want, rtol=1e-5)
  np.testing.assert_allclose(got[0], 0.4 + (0.04 - 0.4) * 0.5 * (1 + math.cos(math.pi / 100)),
                             rtol=1e-6)
  np.testing.assert_allclose(got[49], (0.04 + 0.4) / 2, rtol=1e-6)  # Reference step 50 of 100.
  np.testing.assert_allclose(got[99], 0.4, rtol=1e-6)
  np.testing.assert_allclose(got[100:], 0.4, rtol=1e-6)
  c.ipe_scale = 1.25
  got = values(optim.wd_schedule(*specs(c)), 100)
  np.testing.assert_allclose(got, [ref_wd(k + 1, 125, 0.04, 0.4) for k in range(100)], rtol=1e-5)


def test_ema_schedule():
  c = small_config()
  got = values(optim.ema_schedule(*specs(c)), 110)
  np.testing.assert_allclose(got[:101], [ref_momentum(i, 100, 1.0) for i in range(101)],
                             rtol=1e-7)
  assert got[0] == pytest.approx(0.996, abs=1e-7) and got[100] == pytest.approx(1.0, abs=1e-7)
  np.testing.assert_allclose(got[101:], 1.0)
  c.ipe_scale = 1.25
  got = values(optim.ema_schedule(*specs(c)), 101)
  np.testing.assert_allclose(got, [ref_momentum(i, 100, 1.25) for i in range(101)], rtol=1e-7)
  np.testing.assert_allclose(got[100], 0.996 + 0.004 / 1.25, rtol=1e-7)
  c.ipe_scale = 0.0
  with pytest.raises(ValueError, match='ipe_scale'):
    optim.ema_schedule(*specs(c))


# ----------------------------------------- decay mask


def test_weight_decay_mask():
  d, w = 4, 6
  params = {
      'encoder': {
          'patch_embed': {'kernel': np.zeros((2, 2, 3, d)), 'bias': np.zeros(d)},
          'Block_0': {
              'ln1': {'scale': np.zeros(d), 'bias': np.zeros(d)},
              'qkv': {'kernel': np.zeros((d, 3 * d)), 'bias': np.zeros(3 * d)},
          },
          # nn.scan stacks every leaf on a leading layer axis: LN scale/bias become 2-D.
          'blocks': {
              'ln1': {'scale': np.zeros((3, d)), 'bias': np.zeros((3, d))},
              'mlp': {'kernel': np.zeros((3, d, d)), 'bias': np.zeros((3, d))},
          },
          'norm': {'scale': np.zeros(d), 'bias': np.zeros(d)},
      },
      'predictor': {'mask_token': np.zeros((1, 1, w)),
                    'embed': {'kernel': np.zeros((d, w)), 'bias': np.zeros(w)}},
  }
  want = {
      'encoder': {
          'patch_embed': {'kernel': True, 'bias': False},
          'Block_0': {'ln1': {'scale': False, 'bias': False},
                      'qkv': {'kernel': True, 'bias': False}},
          'blocks': {'ln1': {'scale': False, 'bias': False},
                     'mlp': {'kernel': True, 'bias': False}},
          'norm': {'scale': False, 'bias': False},
      },
      'predictor': {'mask_token': True,  # 3-D and not a bias: decayed, as the reference.
                    'embed': {'kernel': True, 'bias': False}},
  }
  assert optim.weight_decay_mask(params) == want


# ----------------------------------------- AdamW step vs numpy (torch.optim.AdamW semantics)


def np_torch_adamw(params, grads_seq, lrs, wds, decay, b1=0.9, b2=0.999, eps=1e-8, clip=0.0):
  p = {k: np.asarray(v, np.float64).copy() for k, v in params.items()}
  m = {k: np.zeros_like(v) for k, v in p.items()}
  v = {k: np.zeros_like(x) for k, x in p.items()}
  for t, grads in enumerate(grads_seq, start=1):
    g = {k: np.asarray(x, np.float64) for k, x in grads.items()}
    if clip > 0:
      norm = math.sqrt(sum((x ** 2).sum() for x in g.values()))
      g = {k: x * min(1.0, clip / norm) for k, x in g.items()}
    lr, wd = lrs[t - 1], wds[t - 1]
    for k in p:
      if decay[k]:
        p[k] *= 1 - lr * wd  # Decoupled decay, scaled by lr (torch AdamW).
      m[k] = b1 * m[k] + (1 - b1) * g[k]
      v[k] = b2 * v[k] + (1 - b2) * g[k] ** 2
      mhat, vhat = m[k] / (1 - b1 ** t), v[k] / (1 - b2 ** t)
      p[k] -= lr * mhat / (np.sqrt(vhat) + eps)
  return p


@pytest.mark.parametrize('clip', [0.0, 0.5])
def test_adamw_steps_match_numpy(clip):
  c = small_config(epochs=2, spe=3, warmup_epochs=1.0, **{'optim.grad_clip': clip})
  total, spe = run_length(c)
  assert (total, spe) == (6, 3)
  rng = np.random.default_rng(0)
  params = {'kernel': rng.normal(size=(3, 4)).astype(np.float32),
            'bias': rng.normal(size=(4,)).astype(np.float32)}
  grads_seq = [{k: rng.normal(size=x.shape).astype(np.float32) for k, x in params.items()}
               for _ in range(3)]
  adamw, length = specs(c)
  tx = optim.make_optimizer(adamw, optim.make_schedules(adamw, length))
  state = tx.init(params)
  p = jax.tree.map(jnp.asarray, params)

  @jax.jit
  def step(p, state, g):
    updates, state = tx.update(g, state, p)
    return jax.tree.map(lambda a, b: a + b, p, updates), state

  for g in grads_seq:
    p, state = step(p, state, g)
  lrs = [ref_lr(k + 1, 3, 6, 2e-4, 1e-3, 1e-6) for k in range(3)]
  wds = [ref_wd(k + 1, 6, 0.04, 0.4) for k in range(3)]
  want = np_torch_adamw(params, grads_seq, lrs, wds, {'kernel': True, 'bias': False}, clip=clip)
  for k in params:
    np.testing.assert_allclose(p[k], want[k], rtol=1e-6, atol=1e-7, err_msg=k)
  # The decay matters in this test (else the comparison could not tell the mask apart).
  no_decay = np_torch_adamw(params, grads_seq, lrs, wds, {'kernel': False, 'bias': False},
                            clip=clip)
  assert np.abs(no_decay['kernel'] - want['kernel']).max() > 1e-7


def test_ema_update():
  rng = np.random.default_rng(1)
  target = {'a': rng.normal(size=(3, 2)).astype(np.float32), 'b': rng.normal(size=5)}
  online = {'a': rng.normal(size=(3, 2)).astype(np.float32), 'b': rng.normal(size=5)}
  target['b'] = target['b'].astype(np.float32)
  online['b'] = online['b'].astype(np.float32)
  out = jax.jit(optim.ema_update)(target, online, 0.996)
  for k in target:
    want = 0.996 * target[k].astype(np.float64) + 0.004 * online[k].astype(np.float64)
    np.testing.assert_allclose(out[k], want, rtol=1e-6)
    assert out[k].dtype == jnp.float32
  same = jax.jit(optim.ema_update)(target, online, 1.0)
  np.testing.assert_array_equal(same['a'], target['a'])


def test_layerwise_lr_multiplier_of_every_parameter_equals_the_formula():
  """BEiT's rule: patch embedding decay^(depth+1), block i decay^(depth-i), final norm 1."""
  from cjepa_jax.models import vit  # pylint: disable=g-import-not-at-top
  depth, decay = 3, 0.65
  images = np.zeros((1, 16, 16, 3), np.float32)
  params = vit.Encoder('Ti/4', depth=depth).init(jax.random.key(0), images)['params']
  mults = optim.layerwise_lr_multipliers(params, depth, decay)
  for path, m in jax.tree_util.tree_leaves_with_path(mults):
    top = path[0].key
    want = (decay ** (depth + 1) if top == 'patch_embed' else
            decay ** (depth - int(top.split('_')[1])) if top.startswith('blocks_') else 1.0)
    np.testing.assert_allclose(np.asarray(m), want, rtol=1e-6, err_msg=str(path))
  # The scanned layout: one multiplier per block on the stacked axis.
  scanned = vit.Encoder('Ti/4', depth=depth, scan=True).init(jax.random.key(0), images)['params']
  m = optim.layerwise_lr_multipliers(scanned, depth, decay)
  np.testing.assert_allclose(np.asarray(m['blocks']['attn']['qkv']['kernel']).ravel(),
                             [decay ** 3, decay ** 2, decay], rtol=1e-6)
  # Scaling updates by the tree is exactly a per-leaf multiplication.
  updates = jax.tree.map(jnp.ones_like, params)
  scaled, _ = optim.scale_by_tree(mults).update(updates, optax.EmptyState())
  for u, mm in zip(jax.tree.leaves(scaled), jax.tree.leaves(mults)):
    np.testing.assert_allclose(np.asarray(u), np.broadcast_to(np.asarray(mm), u.shape))
  with pytest.raises(ValueError, match='layer_decay'):
    optim.layerwise_lr_multipliers(params, depth, 0.0)
