"""Tests of the multi-block mask sampler against loop-based float64 ports of the reference rules."""

import dataclasses
import functools
import json
import math

import jax
import numpy as np
import pytest

from cjepa_jax import config as config_lib
from cjepa_jax import mask_stats as mask_stats_lib
from cjepa_jax import masks as masks_lib

MaskSpec = masks_lib.MaskSpec
SPEC16 = MaskSpec(16, 16)  # 224/14.
SPEC14 = MaskSpec(14, 14)  # 224/16.
SPEC8 = MaskSpec(8, 8, min_keep=4)  # 32/4.
SPEC16Q = dataclasses.replace(SPEC16, reference_quirks=True)
SPEC14Q = dataclasses.replace(SPEC14, reference_quirks=True)
# Compiling dominates the run time: the tests share a few (batch, spec) programs, the four above
# at batch 128 and these two at batch 256.
REACH = MaskSpec(8, 8, min_keep=4, context_tokens=64, allow_overlap=True)
RELAX = MaskSpec(8, 8, min_keep=20, pred_scale=(0.4, 0.5), context_tokens=64)  # Often relaxes.


@functools.lru_cache(maxsize=None)
def _sample(seed, batch, spec):
  """(masks, layout) as numpy, from the module's shared jitted sampler."""
  return jax.tree.map(np.asarray, masks_lib._sample_jit(jax.random.key(seed), batch, spec))


# -- Independent float64 ports of the reference rules (python loops, no shared code). ----------


def _ref_size(u_scale, u_aspect, scale, aspect, gh, gw):
  """multiblock.py _sample_block_size, in python floats."""
  keep = int(gh * gw * (scale[0] + u_scale * (scale[1] - scale[0])))
  a = aspect[0] + u_aspect * (aspect[1] - aspect[0])
  h, w = int(round(math.sqrt(keep * a))), int(round(math.sqrt(keep / a)))
  while h >= gh:
    h -= 1
  while w >= gw:
    w -= 1
  return h, w


def _grid_sizes(spec, scale, aspect, n=1001):
  """(h, w) reached on a dense float64 grid of (scale, aspect) (quirks: a dense u line)."""
  if spec.reference_quirks:
    su = au = np.linspace(0, 1, n * n)
  else:
    su, au = (x.ravel() for x in np.meshgrid(np.linspace(0, 1, n), np.linspace(0, 1, n)))
  keep = np.floor(spec.num_patches * (scale[0] + su * (scale[1] - scale[0])))
  a = aspect[0] + au * (aspect[1] - aspect[0])
  h = np.minimum(np.round(np.sqrt(keep * a)), spec.grid_h - 1)  # Half-to-even, as round().
  w = np.minimum(np.round(np.sqrt(keep / a)), spec.grid_w - 1)
  return set(zip(h.astype(int).tolist(), w.astype(int).tolist()))


def _ref_layout(u, spec):
  """The sampler's placement rule, image by image, from the same uniforms as `_layout`."""
  gh, gw, m = spec.grid_h, spec.grid_w, spec.npred
  ctx_masks, tgt_rects = [], []
  for b in range(u.size.shape[0]):
    us = [float(x) for x in u.size[b]]
    if spec.reference_quirks:
      us = [us[0], us[0], us[1], us[1]]
    th, tw = _ref_size(us[0], us[1], spec.pred_scale, spec.pred_aspect, gh, gw)
    ch, cw = _ref_size(us[2], us[3], spec.enc_scale, spec.enc_aspect, gh, gw)
    excl = 0 if spec.reference_quirks else 1  # randint(0, n - h) vs an inclusive bound.
    corner = lambda x, size, grid: min(int(x * (grid - size + excl)), grid - size + excl - 1)
    rects = [(corner(u.tgt[b, k, 0], th, gh), corner(u.tgt[b, k, 1], tw, gw), th, tw)
             for k in range(m)]
    tgt_rects.append(rects)
    chosen = None
    levels = [0] if spec.allow_overlap else range(m, -1, -1)  # All targets first, then relax.
    for level in levels:
      for t in range(u.ctx.shape[1]):
        top, left = corner(u.ctx[b, t, 0], ch, gh), corner(u.ctx[b, t, 1], cw, gw)
        mask = np.zeros((gh, gw), bool)
        mask[top:top + ch, left:left + cw] = True
        for (r, c, h, w) in rects[:level]:
          mask[r:r + h, c:c + w] = False
        if mask.sum() > spec.min_keep:
          chosen = mask
          break
      if chosen is not None:
        break
    ctx_masks.append(chosen)
  return np.stack(ctx_masks), tgt_rects


def _reference_collator(rng, batch, spec):
  """multiblock.py MaskCollator.__call__ (retries and relaxation included), loop by loop.

  Returns the per-image context sizes before the batch truncation and the target block sizes.
  """
  gh, gw = spec.grid_h, spec.grid_w
  r = rng.random()
  ph, pw = _ref_size(r, r, spec.pred_scale, spec.pred_aspect, gh, gw)
  r = rng.random()
  eh, ew = _ref_size(r, r, spec.enc_scale, (1.0, 1.0), gh, gw)

  def block(h, w, regions=()):
    tries, timeout = 0, 20
    while True:
      top, left = rng.integers(0, gh - h), rng.integers(0, gw - w)
      mask = np.zeros((gh, gw), bool)
      mask[top:top + h, left:left + w] = True
      for region in regions[:max(len(regions) - tries, 0)]:
        mask &= region
      if mask.sum() > spec.min_keep:
        complement = np.ones((gh, gw), bool)
        complement[top:top + h, left:left + w] = False
        return mask.sum(), complement
      timeout -= 1
      if timeout == 0:
        tries, timeout = tries + 1, 20

  ctx, tgt = [], []
  for _ in range(batch):
    sizes, complements = zip(*[block(ph, pw) for _ in range(spec.npred)])
    tgt.extend(sizes)
    ctx.append(block(eh, ew, list(complements))[0])
  return np.array(ctx), np.array(tgt)


def _uniforms(seed, n, spec):
  rng = np.random.default_rng(seed)
  return masks_lib._Uniforms(size=rng.random((n, 4)), tgt=rng.random((n, spec.npred, 2)),
                             ctx=rng.random((n, masks_lib._CONTEXT_TRIES, 2)))


def _target_union(masks, spec):
  """[B, H*W] bool: patches in any valid target slot."""
  b, n = masks.ctx_idx.shape[0], spec.num_patches
  union = np.zeros((b, n + 1), bool)
  np.put_along_axis(union, np.where(masks.tgt_valid, masks.tgt_idx, n).reshape(b, -1), True, 1)
  return union[:, :n]


def _context_set(masks, spec):
  """[B, H*W] bool: patches in a valid context slot."""
  b, n = masks.ctx_idx.shape[0], spec.num_patches
  ctx = np.zeros((b, n + 1), bool)
  np.put_along_axis(ctx, np.where(masks.ctx_valid, masks.ctx_idx, n), True, 1)
  return ctx[:, :n]


# -- The placement rule. ------------------------------------------------------------------------


@pytest.mark.parametrize('spec', [
    SPEC16, SPEC16Q, RELAX, dataclasses.replace(RELAX, reference_quirks=True),
    MaskSpec(6, 9, npred=3, min_keep=4, allow_overlap=True),
])
def test_layout_matches_loop_reference(spec):
  u = _uniforms(1, 64, spec)
  layout = masks_lib._layout(u, spec, np)
  want_ctx, want_rects = _ref_layout(u, spec)
  np.testing.assert_array_equal(layout.ctx_mask, want_ctx)
  got_rects = [[(int(layout.tgt_top[b, k]), int(layout.tgt_left[b, k]), int(layout.tgt_h[b]),
                 int(layout.tgt_w[b])) for k in range(spec.npred)] for b in range(64)]
  assert got_rects == want_rects


@pytest.mark.parametrize('seed,batch,spec', [(0, 128, SPEC16), (0, 128, SPEC14Q),
                                             (0, 256, RELAX)])
def test_jax_layout_is_the_numpy_layout(seed, batch, spec):
  # The jitted sampler's placement equals the (loop-checked) numpy one on the same uniforms.
  _, layout = _sample(seed, batch, spec)
  u, _ = masks_lib._draw_uniforms(jax.random.key(seed), batch, spec)
  want = masks_lib._layout(jax.tree.map(np.asarray, u), spec, np)
  for got, ref in zip(layout, want):
    np.testing.assert_array_equal(got, ref)


def test_relaxation_happens_and_min_keep_holds():
  masks, layout = _sample(0, 256, RELAX)
  ctx_count = layout.ctx_mask.reshape(256, -1).sum(-1)
  assert ctx_count.min() > 20
  np.testing.assert_array_equal(masks.ctx_valid.sum(-1), ctx_count)
  assert (masks.tgt_valid.sum(-1) > 20).all()
  # Some contexts had to give up a target constraint to keep > 20 patches.
  assert (_context_set(masks, RELAX) & _target_union(masks, RELAX)).any()


@pytest.mark.parametrize('spec', [SPEC16, SPEC16Q, SPEC14])
def test_context_and_targets_disjoint(spec):
  masks, layout = _sample(0, 128, spec)
  full = layout.ctx_mask.reshape(128, -1)
  tgt = _target_union(masks, spec)
  assert not (full & tgt).any()
  assert (full.sum(-1) > spec.min_keep).all()
  assert (masks.ctx_valid.sum(-1) > spec.min_keep).all()
  # The context is its 15x15 (16x16 grid) / 13x13 (14x14 grid) block, as in the reference, minus
  # the targets: some placement of that block contains the context and is covered by context and
  # targets together.
  g = spec.grid_h
  full, tgt = full.reshape(128, g, g), tgt.reshape(128, g, g)
  fits = np.zeros(128, bool)
  for top in range(2):
    for left in range(2):
      rect = np.zeros((g, g), bool)
      rect[top:top + g - 1, left:left + g - 1] = True
      fits |= (~full | rect).all((1, 2)) & (full | tgt | ~rect).all((1, 2))
  assert fits.all()


def test_overlap_allowed():
  masks, _ = _sample(0, 256, REACH)
  np.testing.assert_array_equal(masks.ctx_valid.sum(-1), 49)  # The whole 7x7 block.
  assert (_context_set(masks, REACH) & _target_union(masks, REACH)).sum(-1).mean() > 5


@pytest.mark.parametrize('spec', [SPEC16, SPEC16Q, SPEC14, SPEC14Q])
def test_block_shapes(spec):
  allowed = _grid_sizes(spec, spec.pred_scale, spec.pred_aspect)
  assert spec.max_target == max(h * w for h, w in allowed)
  seen = set()
  for seed in range(2):
    masks, _ = _sample(seed, 128, spec)
    assert masks.tgt_idx.shape == masks.tgt_valid.shape == (128, 4, spec.max_target)
    assert masks.tgt_idx.dtype == np.int32 and masks.tgt_valid.dtype == bool
    # One block size per batch.
    np.testing.assert_array_equal(masks.tgt_valid, np.broadcast_to(masks.tgt_valid[0, 0],
                                                                   masks.tgt_valid.shape))
    for b in range(8):
      for k in range(4):
        cells = masks.tgt_idx[b, k][masks.tgt_valid[b, k]]
        r, c = np.divmod(cells, spec.grid_w)
        h, w = r.max() - r.min() + 1, c.max() - c.min() + 1
        # A full h x w rectangle, row by row, in the leading slots.
        assert masks.tgt_valid[b, k, :h * w].all() and len(cells) == h * w
        rect = (r.min() + np.arange(h))[:, None] * spec.grid_w + c.min() + np.arange(w)
        np.testing.assert_array_equal(cells, rect.ravel())
        seen.add((int(h), int(w)))
    # Padded slots point at patch 0.
    assert (masks.tgt_idx[~masks.tgt_valid] == 0).all()
  assert seen <= allowed and len(seen) == 2


@pytest.mark.parametrize('spec', [SPEC16, MaskSpec(6, 9, npred=2, min_keep=4,
                                                   pred_aspect=(0.5, 3.0), enc_scale=(0.3, 0.6),
                                                   enc_aspect=(0.5, 2.0))])
@pytest.mark.parametrize('quirks', [False, True])
def test_enumerated_sizes_match_dense_grid(spec, quirks):
  spec = dataclasses.replace(spec, reference_quirks=quirks)
  for scale, aspect in ((spec.pred_scale, spec.pred_aspect), (spec.enc_scale, spec.enc_aspect)):
    grid = _grid_sizes(spec, scale, aspect, n=301)
    assert grid <= spec._sizes(scale, aspect)
    assert max(h * w for h, w in grid) == max(h * w for h, w in spec._sizes(scale, aspect))
    assert min(h * w for h, w in grid) == min(h * w for h, w in spec._sizes(scale, aspect))


@pytest.mark.parametrize('quirks', [False, True])
def test_row_and_column_reachability(quirks):
  spec = dataclasses.replace(REACH, reference_quirks=quirks)
  cover = []
  for seed in range(3):
    masks, _ = _sample(seed, 256, spec)
    for cells in (_target_union(masks, spec), _context_set(masks, spec)):
      grid = cells.reshape(-1, 8, 8)
      cover.append(np.stack([grid.any(2).sum(0), grid.any(1).sum(0)]))  # [rows/cols, 8]
  cover = np.stack(cover).reshape(3, 2, 2, 8).sum(0)  # [tgt/ctx, rows/cols, 8]
  assert (cover[..., :-1] > 0).all()
  if quirks:  # The reference's exclusive bound never reaches the last row or column.
    assert (cover[..., -1] == 0).all()
  else:
    assert (cover[..., -1] > 0).all()


def test_determinism_and_jit():
  a, _ = _sample(3, 128, SPEC14)
  b = jax.tree.map(np.asarray, masks_lib._sample_jit(jax.random.key(3), 128, SPEC14)[0])
  c, _ = _sample(4, 128, SPEC14)
  # Eager (no jit), with a raw uint32 key holding the same bits.
  d = jax.tree.map(np.asarray, masks_lib.sample_masks(jax.random.PRNGKey(3), 128, SPEC14))
  for x, y, z in zip(a, b, d):
    np.testing.assert_array_equal(x, y)
    np.testing.assert_array_equal(x, z)
  assert not np.array_equal(a.ctx_idx, c.ctx_idx)
  assert not np.array_equal(a.tgt_idx, c.tgt_idx)


@pytest.mark.parametrize('spec', [SPEC16, SPEC16Q])
def test_context_budget(spec):
  kc, n = spec.num_context, spec.num_patches
  kept, avail = np.zeros(16), np.zeros(16)
  for seed in range(2):
    masks, layout = _sample(seed, 128, spec)
    assert masks.ctx_idx.shape == masks.ctx_valid.shape == (128, kc)
    assert masks.ctx_idx.dtype == np.int32 and masks.ctx_valid.dtype == bool
    full = layout.ctx_mask.reshape(128, n)
    np.testing.assert_array_equal(masks.ctx_valid.sum(-1), np.minimum(full.sum(-1), kc))
    assert ((masks.ctx_idx >= 0) & (masks.ctx_idx < n)).all()
    for b in range(128):
      v, idx = masks.ctx_valid[b], masks.ctx_idx[b]
      nv = v.sum()
      assert v[:nv].all() and not v[nv:].any()  # Valid slots first,
      assert (np.diff(idx[:nv]) > 0).all()  # in raster order,
      assert full[b, idx[:nv]].all()  # inside the context;
      assert len(np.unique(idx)) == kc  # padding: distinct in-range patches outside it.
      assert not full[b, idx[nv:]].any()
      if spec.reference_quirks:  # The reference's truncation: the first Kc in raster order.
        np.testing.assert_array_equal(idx[:nv], np.flatnonzero(full[b])[:kc])
    kept += _context_set(masks, spec).reshape(128, 16, 16).sum((0, 2))
    avail += full.reshape(128, 16, 16).sum((0, 2))
  assert (masks.ctx_valid.sum(-1) < kc).any()  # Some images are padded.
  frac = kept[:15] / avail[:15]  # Fraction of each row's context patches kept.
  if spec.reference_quirks:  # Bottom-row bias: the lower rows are dropped first.
    assert frac[:4].mean() > 0.9 and frac[-4:].mean() < 0.5 * frac[:4].mean()
  else:  # A uniform subset: every row keeps the same fraction.
    np.testing.assert_allclose(frac, kept.sum() / avail.sum(), rtol=0.15)


# -- Statistics against the reference's measured numbers (REFERENCE.md) and the loop port. -----


@pytest.mark.parametrize('spec,ctx_ref,tgt_ref', [
    (SPEC16, 67.5, 43.8), (SPEC14, 50.6, 33.2), (SPEC16Q, 67.5, 43.8), (SPEC14Q, 50.6, 33.2)])
def test_statistics_match_reference(spec, ctx_ref, tgt_ref):
  stats = mask_stats_lib.mask_stats(jax.random.key(0), 128, 20, spec)
  assert stats['context_tokens_mean'] == pytest.approx(ctx_ref, rel=0.05)
  assert stats['target_tokens_mean'] == pytest.approx(tgt_ref, rel=0.05)
  assert stats['overlap_tokens'] == 0
  assert stats['Kc'] == spec.num_context and stats['Kt'] == spec.max_target
  assert stats['context_tokens_before_budget_mean'] > stats['context_tokens_mean']
  rows = np.array(stats['row_coverage'])
  assert len(rows) == spec.grid_h and ((rows >= 0) & (rows <= 1)).all()
  assert (rows[-1] == 0) == spec.reference_quirks


def test_default_budget_matches_reference_collator():
  # 8x8 grid (32/4), min_keep 4: reference 10.6 context tokens at batch 256.
  assert SPEC8.num_context == 11
  # The loop port of the reference collator at 224/16: its 1st-percentile context size (the
  # default's definition), its average batch minimum at 128 images and its mean sizes.
  rng = np.random.default_rng(0)
  runs = [_reference_collator(rng, 128, SPEC14Q) for _ in range(24)]
  ctx = np.stack([c for c, _ in runs])
  tgt = np.concatenate([t for _, t in runs])
  assert abs(SPEC14.num_context - np.quantile(ctx, 0.01)) <= 2
  assert abs(SPEC14.num_context - ctx.min(1).mean()) <= 3
  assert SPEC14.num_context == SPEC14Q.num_context == 51
  assert SPEC16.num_context == SPEC16Q.num_context == 68
  stats = mask_stats_lib.mask_stats(jax.random.key(0), 128, 20, SPEC14Q)
  assert stats['context_tokens_before_budget_mean'] == pytest.approx(ctx.mean(), rel=0.03)
  assert stats['target_tokens_mean'] == pytest.approx(tgt.mean(), rel=0.05)


# -- Spec construction and validation. ----------------------------------------------------------


def test_from_config():
  c = config_lib.default_config()
  spec = MaskSpec.from_config(c)
  assert (spec.grid_h, spec.grid_w, spec.npred, spec.min_keep) == (16, 16, 4, 10)
  assert spec.pred_aspect == (0.75, 1.5) and not spec.reference_quirks
  c.model.variant = 'B/16'
  c.mask.reference_quirks = True
  c.mask.context_tokens = 40
  spec = MaskSpec.from_config(c)
  assert (spec.grid_h, spec.num_context, spec.reference_quirks) == (14, 40, True)
  hash(spec)  # Usable as a jit static argument.
  c.data.image_size = 100
  with pytest.raises(ValueError, match='image_size=100.*patch size 16'):
    MaskSpec.from_config(c)
  c.data.image_size = 224
  c.model.variant = 'B'
  with pytest.raises(ValueError, match='variant'):
    MaskSpec.from_config(c)


@pytest.mark.parametrize('kwargs,match', [
    (dict(nenc=2), 'nenc=2 is not supported'),
    (dict(npred=0), 'npred'),
    (dict(pred_scale=(0.0, 0.2)), 'pred_scale'),
    (dict(enc_scale=(0.9, 1.2)), 'enc_scale'),
    (dict(pred_aspect=(1.5, 0.75)), 'pred_aspect'),
    (dict(min_keep=60), 'min_keep=60.*pred_scale or lower min_keep'),
    (dict(pred_scale=(0.01, 0.2)), 'pred block can be as small as'),
    (dict(context_tokens=300), 'context_tokens=300'),
    (dict(grid_h=1), 'at least 2x2'),
    (dict(min_keep=1.5), 'min_keep must be an int'),
])
def test_validation(kwargs, match):
  args = dict(grid_h=16, grid_w=16)
  args.update(kwargs)
  with pytest.raises(ValueError, match=match):
    MaskSpec(**args)


def test_cli_json_and_png(tmp_path, capsys):
  png = tmp_path / 'masks.png'
  # The REACH program (8x8, batch 256) is shared with the reachability test.
  mask_stats_lib.main(['--image_size', '32', '--patch_size', '4', '--batch_size', '256',
                       '--num_batches', '2', '--min_keep', '4', '--context_tokens', '64',
                       '--allow_overlap', '--json', '--png', str(png)])
  stats = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  assert stats['grid'] == [8, 8] and stats['Kc'] == 64 and stats['Kt'] == 12
  assert stats['context_tokens_mean'] == stats['context_tokens_before_budget_mean'] == 49
  assert 9 <= stats['target_tokens_min'] <= stats['target_tokens_mean'] <= stats[
      'target_tokens_max'] <= 12
  assert stats['overlap_tokens'] > 0
  assert len(stats['row_coverage']) == len(stats['col_coverage']) == 8
  assert png.stat().st_size > 1000
