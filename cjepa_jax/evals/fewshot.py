"""Few-shot evaluation by closed-form ridge regression (big_vision's `fewshot_lsr` protocol).

  shot_indices(labels, shots, seed, num_classes)   the k examples of each class, seeded.
  ridge_fit(x, y, num_classes, l2_reg)             the closed-form regressor of k-shot rows.
  fewshot_probe(train_x, train_y, test_x, ...)     test top-1 per k, averaged over seeds.
  TYPE                                             the evaluator 'fewshot': options `shots`,
                                                   `seeds`, `l2_reg`; logs {'fewshot_<k>shot'}.

The protocol, as big_vision's few-shot evaluator (read, not copied):
  * k examples of every class of the train split (k in `shots`, default 1, 5, 10, 25), drawn by a
    seeded per-class permutation; the k-shot sets of one seed are nested (the 5 of 10-shot are
    the 5-shot set). Repeated for `seeds` seeds (default 3); the mean and each seed are reported.
  * Features standardised with the mean and std (+ 1e-5) of the k-shot rows, a constant bias
    feature 100 appended, targets 2 * one_hot - 1 (i.e. +-1), and the ridge solution
    W = (X^T X + l2 I)^{-1} X^T Y, computed through the eigen-decomposition of X^T X or, with
    fewer rows than features, of X X^T (the same W; the dual form is the cheaper one).
  * The regulariser: big_vision's configs fix l2 = 2^10 = 1024 for every k and dataset (its
    evaluator can also sweep several and keep the best, which selects on the test split; we do
    not). `l2_reg` is config.
  * Prediction: argmax of X_test W; top-1 on the whole test split (rows sharded over the mesh).

Cheap (a [k*C, F] solve and one matmul with the test features), so the trainer can run it every
few hundred steps (`config.evals.fewshot.every_steps`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
import functools
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import Mesh
import numpy as np

from cjepa_jax import sharding
from cjepa_jax.evals import base
from cjepa_jax.evals import features as features_lib
from cjepa_jax.evals import units

BIAS_CONSTANT = 100.0
STD_EPS = 1e-5
DEFAULT_L2 = 2.0 ** 10
DEFAULT_SHOTS = (1, 5, 10, 25)
_TEST_CHUNK = 4096  # Test rows per jitted call (a multiple of every device count we use).


def shot_indices(labels: np.ndarray, shots: int, seed: int, num_classes: int) -> np.ndarray:
  """Indices of `shots` examples of every class of `labels [N]`, class by class: `[C * shots]`.

  Class c's examples in a seeded permutation (seed, c), the first `shots` of them: for one seed
  the sets of increasing k are nested. ValueError when a class has fewer than `shots` examples.
  """
  out = []
  for c in range(num_classes):
    idx = np.flatnonzero(labels == c)
    if len(idx) < shots:
      raise ValueError(
          f'Few-shot: class {c} has {len(idx)} training examples, fewer than {shots} shots; '
          'lower config.evals.<name>.shots or use more train examples.')
    perm = np.random.default_rng([seed, c]).permutation(len(idx))
    out.append(idx[np.sort(perm[:shots])])
  return np.concatenate(out)


@jax.jit
def _standardise(x: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
  mean = jnp.mean(x, axis=0)
  std = jnp.std(x, axis=0) + STD_EPS
  return (x - mean) / std, mean, std


@functools.partial(jax.jit, static_argnums=(2,))
def _ridge(x: jax.Array, y: jax.Array, num_classes: int, l2_reg: jax.Array
           ) -> dict[str, jax.Array]:
  """{'w': [F+1, C], 'mean': [F], 'std': [F]} of the k-shot rows x [n, F], labels y [n]."""
  x = x.astype(jnp.float32)
  xs, mean, std = _standardise(x)
  xs = jnp.pad(xs, ((0, 0), (0, 1)), constant_values=BIAS_CONSTANT)          # [n, F+1]
  targets = 2.0 * jax.nn.one_hot(y, num_classes) - 1.0                      # [n, C]
  hi = jax.lax.Precision.HIGHEST
  n, d = xs.shape
  # (X^T X + l2 I)^{-1} X^T Y == X^T (X X^T + l2 I)^{-1} Y: decompose the smaller Gram matrix.
  if n >= d:
    eigs, q = jnp.linalg.eigh(jnp.dot(xs.T, xs, precision=hi))
    lhs, rhs = q, jnp.dot(q.T, jnp.dot(xs.T, targets, precision=hi), precision=hi)
  else:
    eigs, q = jnp.linalg.eigh(jnp.dot(xs, xs.T, precision=hi))
    lhs, rhs = jnp.dot(xs.T, q, precision=hi), jnp.dot(q.T, targets, precision=hi)
  w = jnp.dot(lhs / (eigs + l2_reg)[None, :], rhs, precision=hi)
  return {'w': w, 'mean': mean, 'std': std}


def ridge_fit(x: np.ndarray, y: np.ndarray, num_classes: int, l2_reg: float = DEFAULT_L2
              ) -> dict[str, np.ndarray]:
  """The ridge regressor of rows x [n, F] with labels y [n]: {'w' [F+1, C], 'mean', 'std' [F]}.

  Standardised features (mean / std + 1e-5 of these rows), a bias feature 100, +-1 targets;
  float32 on the default device.
  """
  out = _ridge(jnp.asarray(x, jnp.float32), jnp.asarray(y, jnp.int32), int(num_classes),
               jnp.float32(l2_reg))
  return {k: np.asarray(v) for k, v in out.items()}


@functools.lru_cache(maxsize=16)
def _predict_fn(mesh: Mesh) -> Callable:
  """jit(w, mean, std, x [B, F]) -> predicted class [B], rows split over the mesh."""

  def predict(w, mean, std, x):
    xs = jnp.pad((x - mean) / std, ((0, 0), (0, 1)), constant_values=BIAS_CONSTANT)
    return jnp.argmax(jnp.dot(xs, w, precision=jax.lax.Precision.HIGHEST), axis=-1)

  return jax.jit(predict, out_shardings=sharding.replicated(mesh))


def ridge_predict(fit: dict[str, np.ndarray], x: np.ndarray, mesh: Mesh | None = None
                  ) -> np.ndarray:
  """Predicted classes `[M]` of rows x [M, F] under `ridge_fit`'s regressor."""
  mesh = mesh or features_lib.single_device_mesh()
  replicated = sharding.replicated(mesh)
  data = sharding.batch_sharding(mesh)
  w, mean, std = (features_lib.from_host(np.asarray(fit[k], np.float32), replicated)
                  for k in ('w', 'mean', 'std'))
  chunk = -(-_TEST_CHUNK // mesh.size) * mesh.size
  preds = []
  for start in range(0, len(x), chunk):
    part = np.zeros((chunk, x.shape[1]), np.float32)
    rows = x[start:start + chunk]
    part[:len(rows)] = rows
    out = _predict_fn(mesh)(w, mean, std, features_lib.from_host(part, data))
    preds.append(features_lib.to_host(out)[:len(rows)])
  return np.concatenate(preds) if preds else np.zeros((0,), np.int32)


def fewshot_probe(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray,
                  test_y: np.ndarray, *, num_classes: int, shots: Sequence[int] = DEFAULT_SHOTS,
                  seeds: int = 3, l2_reg: float = DEFAULT_L2, seed: int = 0,
                  mesh: Mesh | None = None) -> dict[str, Any]:
  """Few-shot ridge top-1 (fractions) of the test split for every k of `shots`.

  Returns:
    dict(top1={k: mean over seeds}, top1_std={k: std over seeds}, per_seed={k: [top1 per seed]},
    shots, seeds, l2_reg). Seed s uses `shot_indices(train_y, k, seed + s, C)`.
  """
  shots = tuple(int(k) for k in shots)
  if not shots or min(shots) < 1 or seeds < 1 or l2_reg <= 0:
    raise ValueError(f'Few-shot needs shots >= 1, seeds >= 1 and l2_reg > 0; got shots={shots}, '
                     f'seeds={seeds}, l2_reg={l2_reg}.')
  if train_x.shape[1] != test_x.shape[1]:
    raise ValueError(f'Train and test features differ in width: {train_x.shape} vs {test_x.shape}.')
  features_lib.check_labels(train_y, num_classes, 'Training')
  features_lib.check_labels(test_y, num_classes, 'Test')
  per_seed = {}
  for k in shots:
    accs = []
    for s in range(seeds):
      idx = shot_indices(train_y, k, seed + s, num_classes)
      fit = ridge_fit(train_x[idx], train_y[idx], num_classes, l2_reg)
      accs.append(float(np.mean(ridge_predict(fit, test_x, mesh) == test_y)))
    per_seed[k] = accs
  return dict(top1={k: float(np.mean(v)) for k, v in per_seed.items()},
              top1_std={k: float(np.std(v)) for k, v in per_seed.items()},
              per_seed=per_seed, shots=list(shots), seeds=int(seeds), l2_reg=float(l2_reg))


# ------------------------------------------------------------------------------------------------
# The evaluator.
# ------------------------------------------------------------------------------------------------


def _check(name: str, o: base.Options) -> None:
  shots = tuple(o.shots)
  base.check(len(shots) > 0 and all(isinstance(k, int) and k >= 1 for k in shots), name, 'shots',
             shots, 'must be integers >= 1, e.g. (1, 5, 10, 25)')
  base.check(isinstance(o.seeds, int) and o.seeds >= 1, name, 'seeds', o.seeds,
             'must be an integer >= 1')
  base.check(isinstance(o.l2_reg, (int, float)) and o.l2_reg > 0, name, 'l2_reg', o.l2_reg,
             'must be > 0')


def _build(ctx: base.Context, o: base.Options) -> base.Evaluator:
  """{kind: `fewshot_probe` result} per feature kind of the context."""
  return base.per_kind(ctx, functools.partial(
      fewshot_probe, num_classes=int(ctx.data.num_classes),
      shots=tuple(int(k) for k in o.shots), seeds=int(o.seeds), l2_reg=float(o.l2_reg),
      seed=int(ctx.data.seed), mesh=ctx.mesh))


def _logged(out: base.Results) -> dict[str, Any]:
  (r,) = out.values()
  return units.monitor_to_percent({f'fewshot_{k}shot': v for k, v in r['top1'].items()})


def _entry(out: base.Results, chosen: str, o: base.Options) -> dict[str, Any]:
  del o
  return dict(out[chosen], features=chosen, per_features={kd: r['top1'] for kd, r in out.items()})


def _rows(name: str, e: dict[str, Any]) -> list[tuple[Any, ...]]:
  return [(f'{name} {k}-shot', e['features'], top1, None,
           f'   +-{e["top1_std"][k]:.2f} over {e["seeds"]} seeds, l2={e["l2_reg"]:g}')
          for k, top1 in e['top1'].items()]


def _card_rows(name: str, e: dict[str, Any]) -> list[tuple[str, ...]]:
  del name
  rows = []
  for shots, top1 in (e.get('top1') or {}).items():
    std = (e.get('top1_std') or {}).get(shots)
    rows.append((f'{shots}-shot ridge', e.get('features', ''), base.card_percent(top1), '',
                 f'+- {base.card_percent(std)} over {e.get("seeds")} seeds'
                 if std is not None else ''))
  return rows


TYPE = base.Type('fewshot', _build, check=_check, logged=_logged, entry=_entry, rows=_rows,
                 card_rows=_card_rows,
                 card_protocol="few-shot: ridge regression on k images per class, big_vision's "
                               'fixed l2')
