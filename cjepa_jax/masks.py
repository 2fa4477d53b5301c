"""I-JEPA multi-block masks with static shapes, sampled on the accelerator.

Semantics follow the reference collator (facebookresearch/ijepa, src/masks/multiblock.py):

* Once per call (= per batch) one target block size and one context block size are drawn. A size
  comes from (scale, aspect): keep = int(H*W*scale); h = round(sqrt(keep*aspect));
  w = round(sqrt(keep/aspect)); h (resp. w) is shrunk while >= H (resp. W), i.e. capped at H-1.
* Per image: `npred` target rectangles placed independently and uniformly; one context rectangle
  from which every patch of every target is removed (unless `allow_overlap`).
* A context is accepted only with more than `min_keep` patches. The reference retries a placement
  20 times, then drops the constraint of the last target and retries 20 more, and so on. Here the
  same intent is a fixed number of vectorised tries: `_CONTEXT_TRIES` (20) candidate placements per
  image are scored against every relaxation level (all targets, all but the last, ..., none) at
  once; the image takes the strictest level that has an acceptable candidate, and the first
  acceptable candidate at that level. The unconstrained level always accepts (validated), so there
  is always an answer and no data-dependent loop.
* Targets need no retries: a target is unconstrained, so it has h*w patches, and h*w > min_keep is
  checked once in `MaskSpec` (the reference would loop forever otherwise).

Where we differ from the reference on purpose (`reference_quirks=False`, the default): scale and
aspect are drawn independently (the reference uses one uniform number for both, so they are
perfectly correlated), and the top-left corner is drawn with an inclusive upper bound so that the
last row and column can be covered (the reference's exclusive bound never covers them). Both
fixes are the later V-JEPA code's. `reference_quirks=True` restores both for exact parity.

Static shapes. The reference truncates every context in a batch to the batch's shortest one,
dropping its bottom-most indices, so that the batch stacks. Here every image gets a fixed budget of
Kc = `MaskSpec.num_context` context slots and every target block Kt = `MaskSpec.max_target` slots,
with validity masks:
* An image with more than Kc context patches keeps a uniformly random subset of Kc of them
  (`reference_quirks=False`), which avoids the reference's bias against the bottom rows; with
  `reference_quirks=True` it keeps the first Kc in raster order, as the reference's truncation
  does. Kept indices are returned in raster order; an image with fewer patches is padded.
* The default Kc (`context_tokens=0`) reproduces the context length the reference trains with.
  The reference's length is the smallest context of each batch, so it depends on the batch size;
  the rule used here is the 1st percentile of the reference collator's per-image context size
  (99% of images fill the budget), estimated once per spec by a fixed-seed numpy Monte Carlo of
  this very sampler with the reference's semantics (`reference_quirks=True`; cached). It gives 68
  at 224/14 (reference, batch 128: 67.5 on average), 51 at 224/16 (50.6) and 11 at 32/4 with
  min_keep 4 (batch 256: 10.6); the expected batch minimum itself would give 69 / 50 / 12 at batch
  128, and 66 / 48 / 11 at 256. Unlike the reference's, the length is fixed, so it does not
  fluctuate from batch to batch (48 to 90 at 224/14). Explicit `context_tokens` overrides it.
* Target slot k of a block at (top, left, h, w) is patch (top + k // w, left + k % w), valid iff
  k < h*w. Kt is the largest h*w the spec's scale / aspect ranges can produce (exact enumeration).
* Padded slots hold an in-range patch index (targets: 0; context: some patch outside the context)
  and valid = False, so gathers never go out of bounds.

Design: masks are sampled INSIDE the jitted train step from a JAX key, vectorised over the batch
(`sample_masks(key, batch_size, spec)`), not in the input pipeline. It is one threefry draw, a
few hundred elementwise ops on [B, npred+1, H, W]-sized arrays, one small batched matmul
([B, npred+1, H, W] x [B, W, 20]) and a top-k over the H*W patches of each image: it costs the
accelerator next to nothing beside a ViT step (a batch of 2048 at 16x16 takes ~0.1 s even on 2
busy CPU cores) and the host nothing. Masks are a pure function of the step key, so a resumed run
reproduces them exactly, and the input pipeline stays a plain image stream.
Calling it with the global batch draws one block size per global batch (as the reference, whose
per-batch size generator is seeded with the iteration number on every rank).

`python -m cjepa_jax.mask_stats --image_size 224 --patch_size 14 --json` prints the statistics the
reference's collator was measured with (see REFERENCE.md) and can draw a few masks (`--png`).

Why this module is longer than 450 lines: it is one sampler, and most of its length is the record
above and in the code of how each step matches (or, with `reference_quirks`, reproduces) the
reference collator; the statistics and pictures of the masks are `cjepa_jax/mask_stats.py`.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

# Candidate context placements per image; the reference retries 20 times per relaxation level.
_CONTEXT_TRIES = 20
# The default context budget Kc is this quantile of the reference collator's per-image context
# size: 99% of images fill the budget. It reproduces the context length the reference's batch
# truncation leaves at its measured settings (REFERENCE.md) to within 4%: 68 vs 67.5 at 224/14 and
# batch 128, 51 vs 50.6 at 224/16 and batch 128, 11 vs 10.6 at 32/4 and batch 256 (the expected
# batch minimum itself depends on the batch size: at 32/4 it is 11.5 for 128 images).
_REFERENCE_QUANTILE = 0.01
# Images simulated (fixed seed) to estimate it; the standard error is about one token.
_REFERENCE_SAMPLES = 8192
# Relative slack when enumerating the achievable block sizes, so that float32 rounding in the
# sampler can never produce a block larger than the enumerated maximum.
_SIZE_SLACK = 1e-6


def _pair(value: Any, name: str) -> tuple[float, float]:
  try:
    lo, hi = (float(v) for v in value)
  except (TypeError, ValueError):
    raise ValueError(
        f'MaskSpec.{name} must be a pair (lo, hi) of numbers, got {value!r}.') from None
  return lo, hi


@dataclasses.dataclass(frozen=True)
class MaskSpec:
  """What to sample: the patch grid and the reference collator's knobs (see the module doc).

  Attributes:
    grid_h, grid_w: patches per column / row (image size // patch size).
    npred: target blocks per image (M).
    nenc: context blocks per image; only 1 is supported.
    pred_scale, pred_aspect: (lo, hi) ranges of a target block's area fraction and h/w ratio.
    enc_scale, enc_aspect: the same for the context block.
    min_keep: a context (and a target) must keep more than this many patches.
    allow_overlap: keep target patches in the context.
    reference_quirks: correlated scale/aspect, exclusive corner bound and raster-order context
      truncation, as the reference code; False gives the V-JEPA fixes and a random context subset.
    context_tokens: the fixed context budget Kc; 0 picks the reference-matching default.
  """
  grid_h: int
  grid_w: int
  npred: int = 4
  nenc: int = 1
  pred_scale: tuple[float, float] = (0.15, 0.2)
  pred_aspect: tuple[float, float] = (0.75, 1.5)
  enc_scale: tuple[float, float] = (0.85, 1.0)
  enc_aspect: tuple[float, float] = (1.0, 1.0)
  min_keep: int = 10
  allow_overlap: bool = False
  reference_quirks: bool = False
  context_tokens: int = 0

  def __post_init__(self):
    # Normalise sequences to tuples of floats so that specs are hashable (jit static args).
    for name in ('pred_scale', 'pred_aspect', 'enc_scale', 'enc_aspect'):
      object.__setattr__(self, name, _pair(getattr(self, name), name))
    for name in ('grid_h', 'grid_w', 'npred', 'nenc', 'min_keep', 'context_tokens'):
      value = getattr(self, name)
      if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ValueError(f'MaskSpec.{name} must be an int, got {value!r}.')
      object.__setattr__(self, name, int(value))
    object.__setattr__(self, 'allow_overlap', bool(self.allow_overlap))
    object.__setattr__(self, 'reference_quirks', bool(self.reference_quirks))
    self._validate()

  def _validate(self):
    h, w = self.grid_h, self.grid_w
    if h < 2 or w < 2:
      raise ValueError(f'The patch grid must be at least 2x2, got {h}x{w}: use a larger image or '
                       'a smaller patch.')
    if self.nenc != 1:
      raise ValueError(f'MaskSpec.nenc={self.nenc} is not supported: only one context block per '
                       'image is implemented (every reference recipe uses 1); set mask.nenc=1.')
    if self.npred < 1:
      raise ValueError(f'MaskSpec.npred must be >= 1, got {self.npred}.')
    for name in ('pred_scale', 'enc_scale'):
      lo, hi = getattr(self, name)
      if not 0 < lo <= hi <= 1:
        raise ValueError(f'MaskSpec.{name}={(lo, hi)} must satisfy 0 < lo <= hi <= 1 (a fraction '
                         'of the image area).')
    for name in ('pred_aspect', 'enc_aspect'):
      lo, hi = getattr(self, name)
      if not 0 < lo <= hi:
        raise ValueError(f'MaskSpec.{name}={(lo, hi)} must satisfy 0 < lo <= hi (height / width).')
    if self.min_keep < 0:
      raise ValueError(f'MaskSpec.min_keep must be >= 0, got {self.min_keep}.')
    if not 0 <= self.context_tokens <= h * w:
      raise ValueError(f'MaskSpec.context_tokens={self.context_tokens} must be in [0, {h * w}] '
                       '(the number of patches); 0 picks the reference-matching default.')
    # The sampler caps a block's sides at grid - 1 (as the reference's `while h >= height`). For
    # the context block that cap is the recipe (enc_scale up to 1.0); a target block that needs it
    # would silently shrink below its pred_scale, so that is refused.
    keep = math.floor(h * w * self.pred_scale[1])
    tall = round(math.sqrt(keep * self.pred_aspect[1]))
    wide = round(math.sqrt(keep / self.pred_aspect[0]))
    if tall > h - 1 or wide > w - 1:
      raise ValueError(
          f'mask.pred_scale={self.pred_scale} with mask.pred_aspect={self.pred_aspect} asks for '
          f'target blocks up to {tall}x{wide} patches, but the {h}x{w} grid holds at most '
          f'{h - 1}x{w - 1}: lower mask.pred_scale or narrow mask.pred_aspect (or use a larger '
          'image).')
    for what, scale, aspect in (('pred', self.pred_scale, self.pred_aspect),
                                ('enc', self.enc_scale, self.enc_aspect)):
      smallest = min(a * b for a, b in self._sizes(scale, aspect))
      if smallest <= self.min_keep:
        raise ValueError(
            f'A {what} block can be as small as {smallest} patches on the {h}x{w} grid, but '
            f'min_keep={self.min_keep} asks for more than {self.min_keep} (the reference would '
            f'retry forever): raise {what}_scale or lower min_keep.')

  def _sizes(self, scale, aspect) -> frozenset[tuple[int, int]]:
    return _achievable_sizes(scale, aspect, self.grid_h, self.grid_w, self.reference_quirks)

  @classmethod
  def from_config(cls, config) -> MaskSpec:
    """Builds the spec from `config.data.image_size`, `config.model.variant` and `config.mask.*`."""
    image_size = config.data.image_size
    sizes = tuple(image_size) if isinstance(image_size, (tuple, list)) else (image_size,) * 2
    variant = str(config.model.variant)
    _, sep, patch = variant.partition('/')
    if not sep or not patch.isdigit() or int(patch) < 1:
      raise ValueError(f"config.model.variant={variant!r} must look like '<size>/<patch>', e.g. "
                       "'H/14'.")
    patch = int(patch)
    if len(sizes) != 2 or any(int(s) % patch for s in sizes):
      raise ValueError(f'config.data.image_size={image_size} is not divisible by the patch size '
                       f'{patch} of config.model.variant={variant!r}: pick an image size that is a '
                       'multiple of the patch.')
    m = config.mask
    return cls(
        grid_h=int(sizes[0]) // patch, grid_w=int(sizes[1]) // patch,
        npred=m.npred, nenc=m.nenc,
        pred_scale=tuple(m.pred_scale), pred_aspect=tuple(m.pred_aspect),
        enc_scale=tuple(m.enc_scale), enc_aspect=tuple(m.enc_aspect),
        min_keep=m.min_keep, allow_overlap=m.allow_overlap,
        reference_quirks=m.reference_quirks,
        context_tokens=m.get('context_tokens', 0))

  @property
  def num_patches(self) -> int:
    return self.grid_h * self.grid_w

  @property
  def num_context(self) -> int:
    """Kc: the fixed context budget (`context_tokens`, or the reference-matching default)."""
    if self.context_tokens:
      return self.context_tokens
    # Keyed on the reference-semantics spec, so both quirk settings share one estimate.
    return _reference_context_tokens(
        dataclasses.replace(self, reference_quirks=True, context_tokens=0))

  @property
  def max_target(self) -> int:
    """Kt: the largest target block (h*w) the scale / aspect ranges can produce."""
    return max(a * b for a, b in self._sizes(self.pred_scale, self.pred_aspect))


class Masks(NamedTuple):
  """Patch indices (raster order, row * grid_w + col) and validity of context and target tokens.

  ctx_idx [B, Kc] int32, ctx_valid [B, Kc] bool: the context; valid slots first, in raster order.
  tgt_idx [B, M, Kt] int32, tgt_valid [B, M, Kt] bool: the M target blocks, row by row.
  Padded slots hold an in-range index and valid False.
  """
  ctx_idx: jax.Array
  ctx_valid: jax.Array
  tgt_idx: jax.Array
  tgt_valid: jax.Array


# ----------------------------------------------------------------------------------------------
# Block sizes.


@functools.lru_cache(maxsize=None)
def _achievable_sizes(scale: tuple[float, float], aspect: tuple[float, float], grid_h: int,
                      grid_w: int, correlated: bool) -> frozenset[tuple[int, int]]:
  """Every (h, w) the size rule can give for scale / aspect in their (closed) ranges.

  Exact enumeration: for each integer keep, h and w are step functions of the aspect whose steps
  sit where sqrt(keep*a) or sqrt(keep/a) crosses a half-integer; evaluating at the ends and
  between consecutive steps visits every value. `correlated`: one uniform u sets both scale and
  aspect (reference quirk), so each keep only sees the aspects of its own u interval. Ranges are
  widened by `_SIZE_SLACK` (conservative: float32 rounding in the sampler stays inside).
  """
  n = grid_h * grid_w
  (s0, s1), (a0, a1) = scale, aspect
  k_lo = max(math.floor(n * s0 * (1 - _SIZE_SLACK)), 0)
  k_hi = math.floor(n * s1 * (1 + _SIZE_SLACK))
  sizes = set()
  for keep in range(k_lo, k_hi + 1):
    lo, hi = a0 * (1 - _SIZE_SLACK), a1 * (1 + _SIZE_SLACK)
    if correlated and s1 > s0:
      # u interval on which int(n * s(u)) == keep.
      u_lo = (keep / n - s0) / (s1 - s0) - _SIZE_SLACK
      u_hi = ((keep + 1) / n - s0) / (s1 - s0) + _SIZE_SLACK
      u_lo, u_hi = max(u_lo, 0.0), min(u_hi, 1.0)
      if u_lo > u_hi:
        continue
      lo, hi = a0 + u_lo * (a1 - a0), a0 + u_hi * (a1 - a0)
    points = {lo, hi}
    if keep > 0:
      for x in range(grid_h + grid_w + 2):
        for step in ((x + 0.5) ** 2 / keep, keep / (x + 0.5) ** 2):
          if lo < step < hi:
            points.add(step)
    points = sorted(points)
    points += [(p + q) / 2 for p, q in zip(points[:-1], points[1:])]
    for a in points:
      h = min(round(math.sqrt(keep * a)), grid_h - 1)
      w = min(round(math.sqrt(keep / a)), grid_w - 1)
      sizes.add((h, w))
  return frozenset(sizes)


def _block_size(u_scale, u_aspect, scale, aspect, grid_h, grid_w, xp):
  """The reference's size rule, elementwise on uniforms [...] -> (h, w) int32 [...]."""
  s = scale[0] + u_scale * (scale[1] - scale[0])
  a = aspect[0] + u_aspect * (aspect[1] - aspect[0])
  keep = xp.floor(grid_h * grid_w * s)
  # round() is round-half-to-even in python, numpy and jax alike.
  h = xp.minimum(xp.round(xp.sqrt(keep * a)), grid_h - 1).astype(np.int32)
  w = xp.minimum(xp.round(xp.sqrt(keep / a)), grid_w - 1).astype(np.int32)
  return h, w


def _corner(u, size, grid, quirks, xp):
  """Top (or left) coordinate: uniform in [0, grid - size] (quirks: [0, grid - size))."""
  span = grid - size + (0 if quirks else 1)
  return xp.minimum(xp.floor(u * span).astype(np.int32), span - 1)


# ----------------------------------------------------------------------------------------------
# Placement, written once for numpy and jax.numpy (`xp`): the default budget is a numpy Monte
# Carlo of this exact code, the train step runs it under jit.


class _Uniforms(NamedTuple):
  size: Any     # [B, 4] block-size draws (tgt scale, tgt aspect, ctx scale, ctx aspect).
  tgt: Any      # [B, M, 2] target corners (top, left).
  ctx: Any      # [B, T, 2] context candidate corners (top, left).


class _Layout(NamedTuple):
  tgt_top: Any   # [B, M] int32
  tgt_left: Any  # [B, M] int32
  tgt_h: Any     # [B] int32 (one size per batch; per image so that batches can be stacked)
  tgt_w: Any     # [B] int32
  ctx_mask: Any  # [B, H, W] bool, the context after removing the (accepted) targets.


def _spans(start, size, grid, xp):
  """[...] starts and sizes -> [..., grid] bool: which rows (or columns) the blocks cover."""
  i = xp.arange(grid)
  return (i >= start[..., None]) & (i < (start + size)[..., None])


def _layout(u: _Uniforms, spec: MaskSpec, xp) -> _Layout:
  """Places targets and contexts given the uniform draws (see the module doc)."""
  gh, gw, m = spec.grid_h, spec.grid_w, spec.npred
  if spec.reference_quirks:  # One uniform sets both scale and aspect.
    su, au, csu, cau = u.size[:, 0], u.size[:, 0], u.size[:, 1], u.size[:, 1]
  else:
    su, au, csu, cau = u.size[:, 0], u.size[:, 1], u.size[:, 2], u.size[:, 3]
  th, tw = _block_size(su, au, spec.pred_scale, spec.pred_aspect, gh, gw, xp)  # [B]
  ch, cw = _block_size(csu, cau, spec.enc_scale, spec.enc_aspect, gh, gw, xp)  # [B]

  q = spec.reference_quirks
  tgt_top = _corner(u.tgt[..., 0], th[:, None], gh, q, xp)  # [B, M]
  tgt_left = _corner(u.tgt[..., 1], tw[:, None], gw, q, xp)
  tgt = (_spans(tgt_top, th[:, None], gh, xp)[..., :, None]
         & _spans(tgt_left, tw[:, None], gw, xp)[..., None, :])  # [B, M, H, W]

  ctx_top = _corner(u.ctx[..., 0], ch[:, None], gh, q, xp)  # [B, T]
  ctx_left = _corner(u.ctx[..., 1], cw[:, None], gw, q, xp)
  rows = _spans(ctx_top, ch[:, None], gh, xp).astype(np.float32)  # [B, T, H]
  cols = _spans(ctx_left, cw[:, None], gw, xp).astype(np.float32)  # [B, T, W]

  # Relaxation level r constrains the context by the first r targets (the reference drops the last
  # target first): prefix[:, r] = union of targets [0, r), r = npred (strictest) ... 0 (none).
  levels = range(1) if spec.allow_overlap else range(m + 1)
  prefix = [xp.zeros_like(tgt[:, 0])]
  for r in levels[1:]:
    prefix.append(prefix[-1] | tgt[:, r - 1])
  prefix = xp.stack(prefix, axis=1)  # [B, R, H, W]
  # Patches of candidate t covered at level r: sum_ij rows[t, i] * prefix[r, i, j] * cols[t, j],
  # a batched matmul then a small contraction. Counts < 2^24 are exact in float32.
  covered = xp.einsum('bti,brit->btr', rows,
                      prefix.astype(np.float32) @ xp.swapaxes(cols, 1, 2)[:, None])
  kept = (ch * cw)[:, None, None] - covered.astype(np.int32)  # [B, T, R]
  ok = kept > spec.min_keep
  # The strictest level with an acceptable candidate (the unconstrained level always has one),
  # then its first acceptable candidate.
  level = len(levels) - 1 - xp.argmax(xp.any(ok, axis=1)[:, ::-1], axis=1)  # [B]
  ok_at_level = xp.take_along_axis(ok, level[:, None, None], axis=2)[..., 0]  # [B, T]
  pick = xp.argmax(ok_at_level, axis=1)[:, None]  # [B, 1]
  ctx_rows = xp.take_along_axis(rows, pick[..., None], axis=1)[:, 0] > 0  # [B, H]
  ctx_cols = xp.take_along_axis(cols, pick[..., None], axis=1)[:, 0] > 0  # [B, W]
  removed = xp.take_along_axis(prefix, level[:, None, None, None], axis=1)[:, 0]  # [B, H, W]
  ctx_mask = ctx_rows[:, :, None] & ctx_cols[:, None, :] & ~removed
  return _Layout(tgt_top, tgt_left, th, tw, ctx_mask)


@functools.lru_cache(maxsize=None)
def _reference_context_tokens(ref: MaskSpec) -> int:
  """Default Kc: the 1st percentile of the reference collator's per-image context size.

  A fixed-seed numpy Monte Carlo of `_layout` for `ref` (a spec with `reference_quirks=True`);
  every image draws its own block sizes (the per-image marginal is the same as with one size per
  batch). See the module doc.
  """
  rng = np.random.default_rng(0)
  counts = []
  for _ in range(_REFERENCE_SAMPLES // 2048):  # Chunks bound the memory on large grids.
    u = _Uniforms(size=rng.random((2048, 4)), tgt=rng.random((2048, ref.npred, 2)),
                  ctx=rng.random((2048, _CONTEXT_TRIES, 2)))
    counts.append(_layout(u, ref, np).ctx_mask.reshape(2048, -1).sum(-1))
  return int(round(float(np.quantile(np.concatenate(counts), _REFERENCE_QUANTILE))))


# ----------------------------------------------------------------------------------------------
# The jittable sampler.


def _draw_uniforms(key: jax.Array, batch_size: int, spec: MaskSpec) -> tuple[_Uniforms, jax.Array]:
  """All the randomness of a batch, in one threefry call (keeps the compiled program small).

  Returns the placement uniforms (one block-size draw [4] for the whole batch, broadcast to
  [B, 4]; target corners [B, M, 2]; context candidate corners [B, T, 2]) and the random ranks
  [B, H*W] of the context budget.
  """
  b = batch_size
  shapes = [(4,), (b, spec.npred, 2), (b, _CONTEXT_TRIES, 2), (b, spec.num_patches)]
  sizes = [math.prod(shape) for shape in shapes]
  flat = jax.random.uniform(key, (sum(sizes),))
  u_size, u_tgt, u_ctx, u_rank = (
      part.reshape(shape)
      for part, shape in zip(jnp.split(flat, np.cumsum(sizes)[:-1]), shapes))
  return _Uniforms(size=jnp.broadcast_to(u_size, (b, 4)), tgt=u_tgt, ctx=u_ctx), u_rank


def _sample(key: jax.Array, batch_size: int, spec: MaskSpec) -> tuple[Masks, _Layout]:
  """`sample_masks`, also returning the layout (for statistics and tests)."""
  b, m, gw, n = batch_size, spec.npred, spec.grid_w, spec.num_patches
  kc, kt = spec.num_context, spec.max_target
  u, u_rank = _draw_uniforms(key, batch_size, spec)
  layout = _layout(u, spec, jnp)

  # Targets: slot k of a block is patch (top + k // w, left + k % w), valid iff k < h*w.
  k = jnp.arange(kt)
  h, w = layout.tgt_h[:, None, None], layout.tgt_w[:, None, None]  # [B, 1, 1]
  tgt_valid = jnp.broadcast_to(k < h * w, (b, m, kt))
  w = jnp.maximum(w, 1)
  tgt_idx = (layout.tgt_top[..., None] + k // w) * gw + layout.tgt_left[..., None] + k % w
  tgt_idx = jnp.where(tgt_valid, tgt_idx, 0).astype(jnp.int32)

  # Context budget: rank the patches, context ones first, keep the Kc best and return them in
  # raster order, valid ones first. Inside the context the ranking is raster order (quirks: the
  # reference keeps its first, top-most indices) or uniformly random (no bottom-row bias).
  in_ctx = layout.ctx_mask.reshape(b, n)
  idx = jnp.arange(n)
  if spec.reference_quirks:
    rank, first_invalid = jnp.where(in_ctx, idx, n + idx).astype(jnp.float32), n
  else:
    rank, first_invalid = jnp.where(in_ctx, 0.0, 1.0) + u_rank, 1.0
  neg_rank, chosen = jax.lax.top_k(-rank, kc)  # [B, Kc]: the Kc lowest ranks.
  order = jnp.sort(jnp.where(-neg_rank < first_invalid, chosen, n + chosen), axis=1)
  masks = Masks(ctx_idx=(order % n).astype(jnp.int32), ctx_valid=order < n,
                tgt_idx=tgt_idx, tgt_valid=tgt_valid)
  return masks, layout


def sample_masks(key: jax.Array, batch_size: int, spec: MaskSpec) -> Masks:
  """Samples a batch of multi-block masks; jittable (batch_size and spec static), a pure
  function of the key.

  Args:
    key: a PRNG key (raw uint32[2] or typed).
    batch_size: B, the number of images.
    spec: the `MaskSpec`.

  Returns:
    Masks with ctx_idx / ctx_valid [B, Kc] and tgt_idx / tgt_valid [B, M, Kt], where
    Kc = spec.num_context, Kt = spec.max_target, M = spec.npred.
  """
  if batch_size < 1:
    raise ValueError(f'batch_size must be >= 1, got {batch_size}.')
  return _sample(key, batch_size, spec)[0]


# Shared by the statistics (cjepa_jax/mask_stats.py) and the tests: each (batch_size, spec)
# compiles once; returns (masks, layout).
_sample_jit = jax.jit(_sample, static_argnums=(1, 2))
