"""The training objective: the I-JEPA prediction loss plus the optional VICReg (C-JEPA) terms.

Shapes: B images, N patches, M target blocks, K tokens per block (a static maximum; `valid` marks
the real ones), D feature width, P projector width. Every loss is computed in float32 whatever the
input dtype, and padded slots are removed with `jnp.where` (never multiplied by 0), so garbage,
even NaN or inf, in a padded slot reaches neither the value nor the gradient.

I-JEPA (reference: `F.smooth_l1_loss(z, h)` on the M target blocks concatenated along the batch).
In the reference all blocks of a batch have the same size, so its plain mean over elements is the
mean over all target tokens and dims. Ours is the mean over the *valid* target tokens and dims,
each token weighing the same, which is identical whenever the reference's blocks are (the
collator makes them equal-sized), and is the natural extension when our static-shape blocks are
padded.

C-JEPA: L = L_jepa + vicreg.weight * (sim_coeff * inv + std_coeff * var + cov_coeff * cov), with
the VICReg terms of the official VICReg code (Bardes et al.) and one of two readings of where
they apply (config `vicreg.mode`, see `cjepa_loss`). VICReg statistics are taken over the whole
batch passed in; under `jit` with a batch sharded over devices that batch is the global one, so
the statistics are global by construction (the official code all-gathers for the same effect).

SIGReg (LeJEPA, Balestriero and LeCun 2025): L = L_jepa + sigreg.weight * SIGReg(z), z the
mean-pooled context features [B, D] (where C-JEPA's 'context' mode applies VICReg). SIGReg
projects z on `num_slices` random unit directions, drawn afresh each step from the step's key
(inside the jitted step, so every device uses the same ones), and averages over them the
Epps-Pulley statistic of each 1-D projection against N(0, 1):
    EP(x) = N * integral |ecf_x(t) - exp(-t^2 / 2)|^2 exp(-t^2 / 2) dt,
by the trapezoid rule on [-t_max, t_max] (the integrand is even: LeJEPA's half-line weights).
See `sigreg` for what LeJEPA does differently.

Why this module is longer than 450 lines: it is the whole objective, the JEPA loss and the two
regularisers it may carry (VICReg, SIGReg), each resolved once from the config into a spec that
`cjepa_loss` combines; they share the masking and pooling helpers and the float32 rule above.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

# torch.nn.functional.layer_norm's default eps.
TARGET_LN_EPS = 1e-5
# Official VICReg: std = sqrt(var + 1e-4).
VICREG_STD_EPS = 1e-4

LOSS_KINDS = ('smooth_l1', 'l2')
VICREG_MODES = ('context', 'blocks')


def _f32(x: jax.Array) -> jax.Array:
  return jnp.asarray(x, jnp.float32)


def _check_kind(kind: str) -> None:
  if kind not in LOSS_KINDS:
    raise ValueError(f'Unknown loss kind {kind!r}: use one of {LOSS_KINDS} (config loss.kind).')


def normalize_targets(h: jax.Array) -> jax.Array:
  """Layer norm over the feature dim without affine parameters, as the reference's targets.

  Args:
    h: [B, N, D] target-encoder output.

  Returns:
    [B, N, D] float32, `F.layer_norm(h, (D,))` (biased variance, eps 1e-5).
  """
  # Two-pass variance: the targets define the loss, so no fast-variance cancellation here.
  return jax.nn.standardize(_f32(h), axis=-1, epsilon=TARGET_LN_EPS, algorithm='stable')


def gather_tokens(h: jax.Array, idx: jax.Array) -> jax.Array:
  """Picks the tokens of every block.

  Args:
    h: [B, N, D] tokens of each image.
    idx: [B, M, K] int patch indices per block. Padded slots may hold any index; out-of-range
      ones give NaN (jnp's 'fill' gather), which the masked losses discard.

  Returns:
    [B, M, K, D], out[b, m, k] = h[b, idx[b, m, k]].
  """
  if h.ndim != 3 or idx.ndim != 3 or h.shape[0] != idx.shape[0]:
    raise ValueError(f'gather_tokens wants h [B, N, D] and idx [B, M, K]; got {h.shape} and '
                     f'{idx.shape}.')
  return jnp.take_along_axis(h[:, None], idx[..., None], axis=2)


def _masked_mean(x: jax.Array, valid: jax.Array, axis: Any = None) -> jax.Array:
  """Mean of float32 `x` over the entries where `valid` (broadcast to x) is True.

  An all-invalid slice gives 0, not NaN (the count is clamped to 1).
  """
  valid = jnp.broadcast_to(valid, x.shape)
  total = jnp.sum(jnp.where(valid, x, 0.0), axis=axis)
  count = jnp.sum(valid, axis=axis, dtype=jnp.float32)
  return total / jnp.maximum(count, 1.0)


def _masked_diff(x: jax.Array, y: jax.Array, valid: jax.Array) -> jax.Array:
  """float32 x - y with padded entries set to 0 *before* any nonlinearity.

  Masking the input as well as the output (the "double where") keeps the gradient of padded
  entries at exactly 0: masking only the output would give 0 * f'(NaN) = NaN there.
  """
  return jnp.where(valid, _f32(x) - _f32(y), 0.0)


def jepa_loss(pred: jax.Array, target: jax.Array, valid: jax.Array,
              kind: str = 'smooth_l1') -> jax.Array:
  """The I-JEPA prediction loss, mean over valid target tokens and dims.

  Args:
    pred: [B, M, K, D] predictor output.
    target: [B, M, K, D] normalised target tokens (no gradient is stopped here; the caller
      computes them from the EMA encoder under `stop_gradient`).
    valid: [B, M, K] bool, True on real target tokens.
    kind: 'smooth_l1' (reference code: Huber with beta 1, as `F.smooth_l1_loss`) or 'l2' (paper:
      squared error, here averaged over dims like `F.mse_loss`).

  Returns:
    float32 scalar.
  """
  _check_kind(kind)
  valid = valid[..., None]
  diff = _masked_diff(pred, target, valid)
  if kind == 'smooth_l1':
    # optax's Huber with delta 1 is exactly torch's smooth-L1 with beta 1.
    err = optax.losses.huber_loss(diff, delta=1.0)
  else:
    err = optax.losses.squared_error(diff)
  return _masked_mean(err, valid)


def pool_tokens(x: jax.Array, valid: jax.Array) -> jax.Array:
  """Masked mean over tokens: [B, K, D] with valid [B, K] -> float32 [B, D]."""
  if x.ndim != 3 or valid.shape != x.shape[:2]:
    raise ValueError(f'pool_tokens wants x [B, K, D] and valid [B, K]; got {x.shape} and '
                     f'{valid.shape}.')
  return _masked_mean(_f32(x), valid[..., None], axis=-2)


def pool_blocks(x: jax.Array, valid: jax.Array) -> jax.Array:
  """Masked mean over each block's tokens: [B, M, K, D], valid [B, M, K] -> float32 [B, M, D]."""
  if x.ndim != 4 or valid.shape != x.shape[:3]:
    raise ValueError(f'pool_blocks wants x [B, M, K, D] and valid [B, M, K]; got {x.shape} and '
                     f'{valid.shape}.')
  return _masked_mean(_f32(x), valid[..., None], axis=-2)


# ---------------------------------------------------------------------------------------------
# VICReg terms, as the official code. `valid` [N] optionally drops rows (images) from the
# statistics; with it absent every row counts. Row counts are clamped so that a batch of one gives
# finite values (the official code would divide by N - 1 = 0).
# ---------------------------------------------------------------------------------------------


def _rows(x: jax.Array, valid: jax.Array | None) -> tuple[jax.Array, jax.Array]:
  """Centred float32 rows (invalid rows zeroed) and the number of valid rows."""
  if x.ndim != 2:
    raise ValueError(f'VICReg terms want embeddings [N, D]; got shape {x.shape}.')
  x = _f32(x)
  if valid is None:
    valid = jnp.ones(x.shape[:1], bool)
  v = valid[:, None]
  n = jnp.sum(valid, dtype=jnp.float32)
  mean = jnp.sum(jnp.where(v, x, 0.0), axis=0) / jnp.maximum(n, 1.0)
  return jnp.where(v, x - mean, 0.0), n


def vicreg_invariance(x: jax.Array, y: jax.Array, valid: jax.Array | None = None) -> jax.Array:
  """Official VICReg invariance: `F.mse_loss(x, y)`, mean over rows (valid ones) and dims.

  Args:
    x, y: [N, D] embeddings of the two branches.
    valid: optional [N] bool.
  """
  valid = True if valid is None else valid[:, None]
  return _masked_mean(optax.losses.squared_error(_masked_diff(x, y, valid)), valid)


def vicreg_variance(x: jax.Array, valid: jax.Array | None = None) -> jax.Array:
  """Variance (hinge on the std) of ONE branch: mean_d relu(1 - sqrt(var_d + 1e-4)).

  var_d is the unbiased variance over the rows. The official loss is
  vicreg_variance(x) / 2 + vicreg_variance(y) / 2.

  Args:
    x: [N, D]; valid: optional [N] bool.
  """
  xc, n = _rows(x, valid)
  var = jnp.sum(jnp.square(xc), axis=0) / jnp.maximum(n - 1.0, 1.0)
  return jnp.mean(jax.nn.relu(1.0 - jnp.sqrt(var + VICREG_STD_EPS)))


def vicreg_covariance(x: jax.Array, valid: jax.Array | None = None) -> jax.Array:
  """Covariance term of ONE branch: sum of squared off-diagonal entries of C, divided by D.

  C = xc^T xc / (N - 1) with xc centred over the rows. The official loss is
  vicreg_covariance(x) + vicreg_covariance(y).

  Args:
    x: [N, D]; valid: optional [N] bool.
  """
  xc, n = _rows(x, valid)
  cov = xc.T @ xc / jnp.maximum(n - 1.0, 1.0)
  # The diagonal masked out rather than subtracted via `jnp.diagonal(cov)`: the gradient of that
  # gather makes the TPU compiler's cost model return a negative time for the whole train step.
  off_diag = jnp.sum(jnp.square(jnp.where(jnp.eye(cov.shape[0], dtype=bool), 0.0, cov)))
  return off_diag / x.shape[-1]


def _blocks_terms(emb: jax.Array, valid: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
  """The 'blocks' reading: official VICReg between every pair of blocks of the same image.

  For each of the M(M-1)/2 pairs (i < j) of block slots, x = emb[:, i], y = emb[:, j] (the same
  image in the same row) and the pair's terms are as official VICReg:
  inv = mse(x, y), var = var(x)/2 + var(y)/2, cov = cov(x) + cov(y). The three terms are then
  averaged over the pairs. Since every block is in M - 1 pairs this is
  var = mean_m var(emb_m) and cov = 2 mean_m cov(emb_m), computed once per block. A block counts
  only on the images where it is valid (the invariance of a pair: where both are).

  Args:
    emb: [B, M, P] projected block embeddings; valid: [B, M] bool.
  """
  m = emb.shape[1]
  per_block_var = jax.vmap(vicreg_variance, in_axes=(1, 1))(emb, valid)  # [M]
  per_block_cov = jax.vmap(vicreg_covariance, in_axes=(1, 1))(emb, valid)  # [M]
  ii, jj = np.triu_indices(m, k=1)
  per_pair_inv = jax.vmap(vicreg_invariance, in_axes=(1, 1, 1))(
      emb[:, ii], emb[:, jj], valid[:, ii] & valid[:, jj])  # [M(M-1)/2]
  return jnp.mean(per_pair_inv), jnp.mean(per_block_var), 2.0 * jnp.mean(per_block_cov)


@dataclasses.dataclass(frozen=True)
class VICRegSpec:
  """The VICReg part of the objective, resolved from `config.vicreg` once (hashable, static).

  weight: 0 is plain I-JEPA; C-JEPA uses 0.001. mode: 'context' or 'blocks' (see `cjepa_loss`).
  sim_coeff, std_coeff, cov_coeff: VICReg's invariance / variance / covariance coefficients.
  """
  weight: float
  mode: str
  sim_coeff: float
  std_coeff: float
  cov_coeff: float

  def __post_init__(self):
    if self.mode not in VICREG_MODES:
      raise ValueError(f'Unknown vicreg.mode {self.mode!r}: use one of {VICREG_MODES}.')
    if self.weight < 0:
      raise ValueError(f'vicreg.weight must be >= 0 (0 is plain I-JEPA); got {self.weight}.')

  @classmethod
  def from_config(cls, vicreg: Mapping[str, Any]) -> VICRegSpec:
    """From `config.vicreg` (a ConfigDict or a plain mapping with the five keys)."""
    values = {}
    for f in dataclasses.fields(cls):
      try:
        value = vicreg[f.name]
      except KeyError:
        raise ValueError(f'The vicreg config lacks key {f.name!r} (see cjepa_jax/config.py).'
                         ) from None
      values[f.name] = str(value) if f.name == 'mode' else float(value)
    return cls(**values)

  @property
  def enabled(self) -> bool:
    return self.weight > 0


# LeJEPA's defaults (its `SIGReg` / `EppsPulley`): 17 knots on [0, 3]; 256 slices in its minimal
# example (the library's `SlicingUnivariateTest` leaves it to the caller).
SIGREG_KNOTS = 17
SIGREG_T_MAX = 3.0
SIGREG_SLICES = 256


@dataclasses.dataclass(frozen=True)
class SIGRegSpec:
  """The SIGReg part of the objective, from `config.sigreg` once (hashable, static).

  weight: 0 is off. num_slices: random directions per step. t_max, knots: the quadrature.
  """
  weight: float = 0.0
  num_slices: int = SIGREG_SLICES
  t_max: float = SIGREG_T_MAX
  knots: int = SIGREG_KNOTS

  def __post_init__(self):
    if self.weight < 0 or self.num_slices < 1 or self.t_max <= 0 or self.knots < 2:
      raise ValueError(f'Invalid SIGReg settings {self}: need weight >= 0, num_slices >= 1, '
                       't_max > 0, knots >= 2.')

  @classmethod
  def from_config(cls, sigreg: Mapping[str, Any] | None) -> SIGRegSpec:
    if sigreg is None:
      return cls()
    return cls(float(sigreg['weight']), int(sigreg['num_slices']), float(sigreg['t_max']),
               int(sigreg['knots']))

  @property
  def enabled(self) -> bool:
    return self.weight > 0


def epps_pulley(x: jax.Array, t_max: float = SIGREG_T_MAX, knots: int = SIGREG_KNOTS
                ) -> jax.Array:
  """The Epps-Pulley statistic of each column of `x [N, K]` against N(0, 1): [K] float32.

  N * sum_j w_j |ecf(t_j) - phi(t_j)|^2 with t_j = 0 .. t_max (`knots` points), ecf(t) =
  mean_n exp(i t x_n), phi(t) = exp(-t^2 / 2), and w_j the trapezoid weights of
  [-t_max, t_max] folded onto t >= 0 (doubled, except at 0), times phi(t_j). Under H0 its
  expectation is sum_j w_j (1 - phi(t_j)^2), whatever N (`epps_pulley_null_mean`).
  """
  x = _f32(x)
  t = jnp.linspace(0.0, t_max, knots, dtype=jnp.float32)
  phi = jnp.exp(-0.5 * t * t)
  xt = x[..., None] * t                                        # [N, K, T]
  cos_mean = jnp.mean(jnp.cos(xt), axis=0)                     # [K, T]
  sin_mean = jnp.mean(jnp.sin(xt), axis=0)
  err = jnp.square(cos_mean - phi) + jnp.square(sin_mean)
  return x.shape[0] * (err @ _ep_weights(t_max, knots))


def _ep_weights(t_max: float, knots: int) -> jax.Array:
  dt = t_max / (knots - 1)
  w = np.full(knots, 2.0 * dt)
  w[[0, -1]] = dt
  t = np.linspace(0.0, t_max, knots)
  return jnp.asarray(w * np.exp(-0.5 * t * t), jnp.float32)


def epps_pulley_null_mean(t_max: float = SIGREG_T_MAX, knots: int = SIGREG_KNOTS) -> float:
  """E[EP(x)] for x ~ N(0, 1): E|ecf(t) - phi(t)|^2 = (1 - phi(t)^2) / N at every t."""
  t = np.linspace(0.0, t_max, knots)
  return float(np.sum(np.asarray(_ep_weights(t_max, knots)) * (1.0 - np.exp(-t * t))))


def sigreg(z: jax.Array, key: jax.Array, spec: SIGRegSpec) -> jax.Array:
  """SIGReg of `z [B, D]`: the mean Epps-Pulley statistic of `num_slices` random 1-D projections.

  Directions: standard normal [D, S] from `key`, each column normalised to unit length (LeJEPA's
  `SlicingUnivariateTest`). The statistics are over the whole batch passed in (under jit with a
  sharded batch, the global batch), in float32.

  What LeJEPA does differently, and why we do not (yet): it applies SIGReg to a projector's
  output of every augmented view of each image and pairs it with an invariance term between the
  views' projections, as its whole objective, (1 - lambda) * pred + lambda * SIGReg, with no EMA
  teacher. Here it is an anti-collapse term beside the JEPA prediction loss, on the pooled context
  features of the one view JEPA sees, as C-JEPA's VICReg 'context' mode, so that the two
  regularisers are compared on one harness; weight w corresponds to LeJEPA's lambda / (1 -
  lambda).
  """
  z = _f32(z)
  directions = jax.random.normal(key, (z.shape[-1], spec.num_slices), jnp.float32)
  directions = directions / jnp.linalg.norm(directions, axis=0, keepdims=True)
  return jnp.mean(epps_pulley(z @ directions, spec.t_max, spec.knots))


def cjepa_loss(
    pred: jax.Array,
    target: jax.Array,
    tgt_valid: jax.Array,
    *,
    ctx: jax.Array | None = None,
    ctx_valid: jax.Array | None = None,
    block_embeddings: jax.Array | None = None,
    block_valid: jax.Array | None = None,
    kind: str = 'smooth_l1',
    vicreg: VICRegSpec,
    sigreg_spec: SIGRegSpec = SIGRegSpec(),
    sigreg_key: jax.Array | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
  """I-JEPA loss plus the weighted VICReg terms (C-JEPA) and / or SIGReg (LeJEPA's regulariser).

  L = jepa + weight * vicreg (+ sigreg_spec.weight * SIGReg(pool_tokens(ctx))), vicreg =
  sim_coeff * inv + std_coeff * var + cov_coeff * cov.

  Modes (`vicreg.mode`):
    'context': one branch, z = pool_tokens(ctx, ctx_valid) [B, D], the mean-pooled
      context-encoder output of each image. var = vicreg_variance(z) and cov =
      vicreg_covariance(z), each counted once (one branch: no /2 and no sum over two branches).
      inv = the prediction error measured as VICReg's MSE: the mean over valid target tokens and
      dims of (pred - target)^2, i.e. jepa_loss(..., kind='l2'). (With loss.kind 'l2' the JEPA
      term is thus effectively weighted 1 + weight * sim_coeff.)
    'blocks': all three terms between the projected pooled blocks of the same image,
      `block_embeddings` [B, M, P] = projector(pool_blocks(pred, tgt_valid)) from the caller,
      official VICReg on each of the M(M-1)/2 block pairs, averaged over the pairs (see
      `_blocks_terms`). `block_valid` [B, M] defaults to "the block has a valid token".

  weight == 0 gives exactly plain I-JEPA: the total is the JEPA term alone (never 0 * terms, so
  a NaN in an unused term cannot leak). The terms are still returned for logging when their
  inputs are given, else as zeros.

  Args:
    pred: [B, M, K, D] predictor output.
    target: [B, M, K, D] normalised targets (already under stop_gradient).
    tgt_valid: [B, M, K] bool.
    ctx: [B, Kc, D] context-encoder output ('context' mode).
    ctx_valid: [B, Kc] bool; None means all valid.
    block_embeddings: [B, M, P] ('blocks' mode).
    block_valid: [B, M] bool; None means `tgt_valid.any(-1)`.
    kind: 'smooth_l1' or 'l2', the JEPA term.
    vicreg: the VICReg weight, mode and coefficients (`VICRegSpec.from_config(config.vicreg)`).
    sigreg_spec: SIGReg's weight and quadrature (off by default); on, it needs `ctx`.
    sigreg_key: the step's key for SIGReg's random directions.

  Returns:
    (loss, metrics) with float32 scalars; metrics has 'loss', 'jepa', 'vicreg' (unweighted
    coefficient sum), 'vicreg_inv', 'vicreg_var', 'vicreg_cov', and 'sigreg' when it is on.
  """
  mode, weight = vicreg.mode, vicreg.weight
  if pred.shape != target.shape or pred.ndim != 4 or tgt_valid.shape != pred.shape[:3]:
    raise ValueError(f'cjepa_loss wants pred and target [B, M, K, D] and tgt_valid [B, M, K]; '
                     f'got {pred.shape}, {target.shape}, {tgt_valid.shape}.')

  jepa = jepa_loss(pred, target, tgt_valid, kind)
  zero = jnp.zeros((), jnp.float32)
  inv = var = cov = zero
  have_terms = False
  if mode == 'context':
    if ctx is not None:
      if ctx_valid is None:
        ctx_valid = jnp.ones(ctx.shape[:2], bool)
      z = pool_tokens(ctx, ctx_valid)
      inv = jepa_loss(pred, target, tgt_valid, 'l2')
      var, cov = vicreg_variance(z), vicreg_covariance(z)
      have_terms = True
    elif weight > 0:
      raise ValueError("vicreg.mode 'context' with weight > 0 needs ctx (the context-encoder "
                       'output [B, Kc, D]).')
  else:
    if block_embeddings is not None:
      b, m = pred.shape[:2]
      if block_embeddings.ndim != 3 or block_embeddings.shape[:2] != (b, m):
        raise ValueError(f'block_embeddings must be [B, M, P] = [{b}, {m}, P]; got '
                         f'{block_embeddings.shape}.')
      if m < 2:
        raise ValueError(f"vicreg.mode 'blocks' needs at least 2 target blocks; got M = {m} "
                         '(config mask.npred).')
      if block_valid is None:
        block_valid = jnp.any(tgt_valid, axis=-1)
      inv, var, cov = _blocks_terms(block_embeddings, block_valid)
      have_terms = True
    elif weight > 0:
      raise ValueError("vicreg.mode 'blocks' with weight > 0 needs block_embeddings "
                       '(projector(pool_blocks(pred)) [B, M, P]).')

  vic = vicreg.sim_coeff * inv + vicreg.std_coeff * var + vicreg.cov_coeff * cov
  loss = jepa + weight * vic if (weight > 0 and have_terms) else jepa
  metrics = {'jepa': jepa, 'vicreg': vic, 'vicreg_inv': inv, 'vicreg_var': var,
             'vicreg_cov': cov}
  if sigreg_spec.enabled:
    if ctx is None or sigreg_key is None:
      raise ValueError('SIGReg (sigreg.weight > 0) needs ctx (the context-encoder output '
                       '[B, Kc, D]) and the step key.')
    if ctx_valid is None:
      ctx_valid = jnp.ones(ctx.shape[:2], bool)
    metrics['sigreg'] = sigreg(pool_tokens(ctx, ctx_valid), sigreg_key, sigreg_spec)
    loss = loss + sigreg_spec.weight * metrics['sigreg']
  metrics['loss'] = loss
  return loss, {k: _f32(v) for k, v in metrics.items()}
