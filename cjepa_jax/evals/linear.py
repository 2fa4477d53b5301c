"""The linear probe: a softmax classifier on frozen features, its (lr, wd) chosen on TRAIN rows.

  linear_probe(train_x, train_y, test_x, test_y, ...)   the sweep, the choice, the test score.
  holdout_split, feature_stats                          the held-out rows and the standardisation.
  lowshot_indices(labels, fraction, seed, C)            a seeded, class-balanced label fraction
                                                        (the low-shot protocol: 1% / 10%).
  train_linear, evaluate_linear                         a grid of classifiers, trained together.
  TYPE                                                  the evaluator 'linear': options `epochs`,
                                                        `batch_size`, `lrs`, `wds`,
                                                        `holdout_fraction`, `retrain`; it chooses
                                                        the feature kind the others report.

The protocol: a linear softmax classifier on the standardised features (mean / std of the
training rows it is fitted on), zero-initialised, Adam with a cosine decay of the learning rate to
0, an L2 penalty `wd / 2 * |W|^2` on the kernel (coupled, i.e. added to the gradient; `wd` is the
regularisation strength of a logistic regression, independent of the learning rate), minibatches
of `batch_size` for `epochs` epochs. Every (lr, wd) of the grid is trained at once (vmapped). The
best is chosen by top-1 accuracy (ties: lower loss) on a random `holdout_fraction` of the train
split that the sweep does not train on; with `retrain` that (lr, wd) is then retrained on the whole
train split and evaluated once on the test split. The test split never takes part in a choice.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
import functools
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import Mesh
import numpy as np
import optax

from cjepa_jax import sharding
from cjepa_jax.evals import base
from cjepa_jax.evals import features as features_lib

Params = Any
_put = features_lib.from_host  # Host rows -> mesh: many call sites below.


def holdout_split(n: int, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
  """(fit indices, held-out indices) of n training examples: a seeded random `fraction` held out."""
  if not 0 <= fraction < 1:
    raise ValueError(f'linear.holdout_fraction={fraction} must be in [0, 1).')
  perm = np.random.default_rng(seed).permutation(n)
  n_hold = int(round(fraction * n))
  if fraction > 0 and not 1 <= n_hold < n:
    raise ValueError(f'linear.holdout_fraction={fraction} of {n} examples holds out {n_hold}: '
                     'need at least one held-out and one training example; use more data.')
  return np.sort(perm[n_hold:]), np.sort(perm[:n_hold])


def lowshot_indices(labels: np.ndarray, fraction: float, seed: int, num_classes: int
                    ) -> np.ndarray:
  """A fixed, seeded, class-balanced `fraction` of the rows of `labels [N]` (sorted indices).

  Class c keeps max(1, round(fraction * N_c)) of its N_c examples, the first of a seeded
  permutation (seed, c): the I-JEPA paper's 1%-of-ImageNet protocol (~13 images per class) at any
  fraction. The subset depends only on the labels, the fraction and the seed.
  """
  if not 0 < fraction <= 1:
    raise ValueError(f'lowshot.fractions must be in (0, 1]; got {fraction}.')
  out = []
  for c in range(num_classes):
    idx = np.flatnonzero(labels == c)
    if not len(idx):
      raise ValueError(f'Low-shot: class {c} has no training examples.')
    keep = max(1, int(round(fraction * len(idx))))
    perm = np.random.default_rng([seed, c]).permutation(len(idx))
    out.append(idx[perm[:keep]])
  return np.sort(np.concatenate(out))


def feature_stats(x: np.ndarray, idx: np.ndarray, chunk: int = 65536
                  ) -> tuple[np.ndarray, np.ndarray]:
  """Per-dimension mean and std `[F]` (float32, computed in float64) of the rows `idx` of x."""
  total = np.zeros(x.shape[1], np.float64)
  total_sq = np.zeros(x.shape[1], np.float64)
  for start in range(0, len(idx), chunk):  # Chunks: never a float64 copy of all features.
    rows = x[idx[start:start + chunk]].astype(np.float64)
    total += rows.sum(0)
    total_sq += np.square(rows).sum(0)
  mean = total / len(idx)
  var = np.maximum(total_sq / len(idx) - np.square(mean), 0.0)
  return mean.astype(np.float32), np.sqrt(var + 1e-8).astype(np.float32)


def _linear_tx(lr: jax.Array, wd: jax.Array, total_steps: int) -> optax.GradientTransformation:
  """Adam with cosine decay to 0 and an L2 penalty wd/2 |W|^2 on the kernel (not the bias)."""
  decay = optax.cosine_decay_schedule(1.0, max(total_steps, 1))
  return optax.chain(
      optax.add_decayed_weights(wd, mask={'kernel': True, 'bias': False}),
      optax.adam(lambda count: lr * decay(count)))


def _linear_loss(params: Params, x: jax.Array, y: jax.Array, w: jax.Array) -> jax.Array:
  """Mean softmax cross-entropy over the rows with weight w = 1 (w = 0: padding)."""
  logits = x @ params['kernel'] + params['bias']
  ce = optax.softmax_cross_entropy_with_integer_labels(logits, y)
  return jnp.sum(w * ce) / jnp.maximum(jnp.sum(w), 1.0)


@functools.lru_cache(maxsize=32)
def _linear_train_fns(mesh: Mesh, total_steps: int) -> tuple[Callable, Callable]:
  """jitted (init, step) of a grid of G linear classifiers trained together (vmapped over G)."""
  replicated = sharding.replicated(mesh)

  def init(lrs, wds, dim, num_classes):
    g = lrs.shape[0]
    params = {'kernel': jnp.zeros((g, dim, num_classes)), 'bias': jnp.zeros((g, num_classes))}
    opt_state = jax.vmap(lambda p, lr, wd: _linear_tx(lr, wd, total_steps).init(p))(
        params, lrs, wds)
    return params, opt_state

  def step(params, opt_state, lrs, wds, mean, std, x, y, w):
    x = (x - mean) / std  # [B, F], standardised with the statistics of the fitted rows.

    def one(p, s, lr, wd):
      grads = jax.grad(_linear_loss)(p, x, y, w)
      updates, s = _linear_tx(lr, wd, total_steps).update(grads, s, p)
      return optax.apply_updates(p, updates), s

    return jax.vmap(one)(params, opt_state, lrs, wds)

  return (jax.jit(init, static_argnums=(2, 3), out_shardings=replicated),
          jax.jit(step, donate_argnums=(0, 1), out_shardings=replicated))


@functools.lru_cache(maxsize=16)
def _linear_eval_fn(mesh: Mesh) -> Callable:
  """jit(params [G, ...], mean, std, x [B, F], y [B], w [B]) -> sums over the rows with w = 1 of
  (top-1 hits [G], top-5 hits [G], cross-entropy [G])."""

  def evaluate(params, mean, std, x, y, w):
    x = (x - mean) / std
    logits = jnp.einsum('bf,gfc->gbc', x, params['kernel']) + params['bias'][:, None]
    labels = jnp.broadcast_to(y, logits.shape[:-1])
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    top1 = jnp.argmax(logits, axis=-1) == labels
    top5 = features_lib.topk_correct(logits, y, 5)
    return (jnp.sum(w * top1, axis=1), jnp.sum(w * top5, axis=1), jnp.sum(w * ce, axis=1))

  return jax.jit(evaluate, out_shardings=sharding.replicated(mesh))


def batches(idx: np.ndarray, batch_size: int, rng: np.random.Generator | None
             ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
  """(rows [batch_size], weights [batch_size]) covering idx once; the last batch padded (w = 0)."""
  order = idx if rng is None else rng.permutation(idx)
  for start in range(0, len(order), batch_size):
    rows = order[start:start + batch_size]
    w = np.zeros(batch_size, np.float32)
    w[:len(rows)] = 1.0
    yield np.pad(rows, (0, batch_size - len(rows))), w


def padded_batch_size(requested: int, n: int, mesh: Mesh) -> int:
  """`requested` (0: full batch), rounded up to a multiple of the device count, at most ~n."""
  size = requested if 0 < requested < n else n
  return -(-size // mesh.size) * mesh.size


# At most this many probe steps are queued on the devices at a time. With collectives over several
# CPU devices (the tests' 8 fake devices), XLA:CPU can deadlock when many steps are queued at once:
# one device's thread never reaches the all-reduce's rendezvous, and after XLA's termination
# timeout the process aborts ("Termination timeout ... exceeded", "Fatal Python error: Aborted").
# A loop that dispatches 3,000 tiny steps unbounded reproduces it on 2 cores; with at most 2 (or
# 8) in flight it does not. The host loop feeds each step anyway, so the bound costs little.
MAX_STEPS_IN_FLIGHT = 2


def bound_in_flight(step: int, tree: Any) -> None:
  """Waits for `tree` (the latest step's output) every MAX_STEPS_IN_FLIGHT steps."""
  if (step + 1) % MAX_STEPS_IN_FLIGHT == 0:
    jax.block_until_ready(tree)


def train_linear(x: np.ndarray, y: np.ndarray, idx: np.ndarray, mean: np.ndarray,
                 std: np.ndarray, *, num_classes: int, lrs: Sequence[float],
                 wds: Sequence[float], epochs: int, batch_size: int, seed: int,
                 mesh: Mesh) -> Params:
  """Trains one linear classifier per (lrs[g], wds[g]) on rows `idx` of x: params with [G, ...]."""
  batch = padded_batch_size(batch_size, len(idx), mesh)
  total_steps = epochs * -(-len(idx) // batch)
  init, step = _linear_train_fns(mesh, total_steps)
  replicated = sharding.replicated(mesh)
  data = sharding.batch_sharding(mesh)
  lrs_, wds_, mean_, std_ = (_put(np.asarray(a, np.float32), replicated)
                             for a in (lrs, wds, mean, std))
  params, opt_state = init(lrs_, wds_, x.shape[1], int(num_classes))
  rng = np.random.default_rng(seed)
  n = 0
  for _ in range(epochs):
    for rows, w in batches(idx, batch, rng):
      params, opt_state = step(params, opt_state, lrs_, wds_, mean_, std_, _put(x[rows], data),
                               _put(y[rows], data), _put(w, data))
      bound_in_flight(n, params)
      n += 1
  return params


def evaluate_linear(params: Params, x: np.ndarray, y: np.ndarray, idx: np.ndarray,
                    mean: np.ndarray, std: np.ndarray, *, batch_size: int, mesh: Mesh
                    ) -> dict[str, np.ndarray]:
  """Top-1 / top-5 accuracy and mean cross-entropy, each `[G]`, of the classifiers on rows idx."""
  batch = padded_batch_size(batch_size, len(idx), mesh)
  evaluate = _linear_eval_fn(mesh)
  replicated = sharding.replicated(mesh)
  data = sharding.batch_sharding(mesh)
  mean_, std_ = _put(mean, replicated), _put(std, replicated)
  return mean_hits_and_loss(
      lambda rows, w: evaluate(params, mean_, std_, _put(x[rows], data), _put(y[rows], data),
                               _put(w, data)), idx, batch)


def mean_hits_and_loss(evaluate_batch: Callable[[np.ndarray, np.ndarray], Sequence[jax.Array]],
                       idx: np.ndarray, batch: int) -> dict[str, np.ndarray]:
  """{'top1', 'top5', 'loss'} `[G]`: the per-batch sums `evaluate_batch(rows, w)` returns (top-1
  hits, top-5 hits, cross-entropy over the rows with w = 1) accumulated in float64 over `idx`
  in padded batches, divided by len(idx). Shared by the linear and attentive probes."""
  sums = None
  for rows, w in batches(idx, batch, None):
    out = np.stack([features_lib.to_host(o).astype(np.float64) for o in evaluate_batch(rows, w)])
    sums = out if sums is None else sums + out
  top1, top5, loss = sums / len(idx)
  return dict(top1=top1, top5=top5, loss=loss)


def linear_probe(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray,
                 test_y: np.ndarray, *, num_classes: int, lrs: Sequence[float],
                 wds: Sequence[float], epochs: int, batch_size: int, holdout_fraction: float,
                 retrain: bool = True, seed: int = 0, mesh: Mesh | None = None
                 ) -> dict[str, Any]:
  """Sweeps (lr, wd), picks the best on a held-out part of the TRAIN split, reports the test split.

  Args:
    train_x, train_y: training features [N, F] and labels [N].
    test_x, test_y: test features [M, F] and labels [M]; used once, after the choice.
    num_classes: C.
    lrs, wds: the grid (every lr with every wd), trained together.
    epochs, batch_size: per classifier; batch_size 0 means full batch.
    holdout_fraction: fraction of the training rows held out to choose (lr, wd); 0 is allowed
      only for a grid of one point (nothing to choose).
    retrain: retrain the chosen (lr, wd) on all training rows before the test (else the chosen
      classifier of the sweep, fitted without the held-out rows, is tested).
    seed: the holdout split and the minibatch order.
    mesh: minibatches are split over its devices (default: one device).

  Returns:
    dict(top1, top5 (test, fractions), best_lr, best_wd, holdout_top1, holdout_loss, holdout_n
    (the number of held-out rows, for the holdout's standard error), retrained, dim,
    sweep=[dict(lr, wd, holdout_top1, holdout_loss), ...]).
  """
  mesh = mesh or features_lib.single_device_mesh()
  lrs, wds = tuple(float(v) for v in lrs), tuple(float(v) for v in wds)
  if not lrs or not wds or min(lrs) <= 0 or min(wds) < 0:
    raise ValueError(f'linear.lrs must be non-empty and > 0 and linear.wds non-empty and >= 0; '
                     f'got {lrs} and {wds}.')
  if epochs < 1:
    raise ValueError(f'linear.epochs={epochs} must be >= 1.')
  if train_x.shape[1] != test_x.shape[1]:
    raise ValueError(f'Train and test features differ in width: {train_x.shape} vs {test_x.shape}.')
  features_lib.check_labels(train_y, num_classes, 'Training')
  features_lib.check_labels(test_y, num_classes, 'Test')
  grid = [(lr, wd) for lr in lrs for wd in wds]
  if len(grid) > 1 and holdout_fraction <= 0:
    raise ValueError(f'The sweep over {len(grid)} (lr, wd) pairs needs held-out training data to '
                     'choose from: set linear.holdout_fraction > 0 (e.g. 0.1), or give one lr '
                     'and one wd.')
  common = dict(num_classes=num_classes, epochs=epochs, batch_size=batch_size, seed=seed,
                mesh=mesh)
  all_idx = np.arange(len(train_y))
  fit_idx, hold_idx = holdout_split(len(train_y), holdout_fraction, seed)
  mean, std = feature_stats(train_x, fit_idx)
  sweep = []
  best = 0
  chosen_params = None
  if len(hold_idx):
    params = train_linear(train_x, train_y, fit_idx, mean, std, lrs=[g[0] for g in grid],
                          wds=[g[1] for g in grid], **common)
    held = evaluate_linear(params, train_x, train_y, hold_idx, mean, std,
                           batch_size=batch_size, mesh=mesh)
    sweep = [dict(lr=lr, wd=wd, holdout_top1=float(held['top1'][g]),
                  holdout_loss=float(held['loss'][g])) for g, (lr, wd) in enumerate(grid)]
    # Best top-1 on the held-out rows; ties go to the lower held-out loss, then grid order.
    best = min(range(len(grid)), key=lambda g: (-held['top1'][g], held['loss'][g], g))
    chosen_params = jax.tree.map(lambda a: a[best:best + 1], params)
  best_lr, best_wd = grid[best]
  retrained = retrain or chosen_params is None
  if retrained:
    mean, std = feature_stats(train_x, all_idx)
    chosen_params = train_linear(train_x, train_y, all_idx, mean, std, lrs=[best_lr],
                                 wds=[best_wd], **common)
  test = evaluate_linear(chosen_params, test_x, test_y, np.arange(len(test_y)), mean, std,
                         batch_size=batch_size, mesh=mesh)
  return dict(top1=float(test['top1'][0]), top5=float(test['top5'][0]), best_lr=best_lr,
              best_wd=best_wd,
              holdout_top1=sweep[best]['holdout_top1'] if sweep else None,
              holdout_loss=sweep[best]['holdout_loss'] if sweep else None,
              holdout_n=int(len(hold_idx)), retrained=bool(retrained),
              dim=int(train_x.shape[1]), sweep=sweep)


# ------------------------------------------------------------------------------------------------
# The evaluator.
# ------------------------------------------------------------------------------------------------


def check_options(name: str, o: base.Options) -> None:
  """The linear probe's options (also the low-shot probe's, which runs it)."""
  base.check(isinstance(o.epochs, int) and o.epochs >= 1, name, 'epochs', o.epochs,
             'must be an integer >= 1')
  base.check(0 <= o.holdout_fraction < 1, name, 'holdout_fraction', o.holdout_fraction,
             'must be in [0, 1)')


def probe_options(o: base.Options, ctx: base.Context) -> dict[str, Any]:
  """`linear_probe`'s keyword arguments from an entry (the low-shot probe's too)."""
  return dict(num_classes=int(ctx.data.num_classes), lrs=o.lrs, wds=o.wds,
              epochs=int(o.epochs), batch_size=o.batch_size,
              holdout_fraction=o.holdout_fraction, retrain=o.retrain, seed=ctx.data.seed,
              mesh=ctx.mesh)


def _build(ctx: base.Context, o: base.Options) -> base.Evaluator:
  """{kind: `linear_probe` result} for every feature kind of the context."""
  return base.per_kind(ctx, functools.partial(linear_probe, **probe_options(o, ctx)))


def _choose(out: base.Results, kinds: tuple[str, ...]) -> str:
  """The better kind on the held-out train rows (ties: 'last'), never on the test split."""
  return min(kinds, key=lambda kd: (-(out[kd]['holdout_top1'] or 0.0),
                                    out[kd]['holdout_loss'] or 0.0, kinds.index(kd)))


def _entry(out: base.Results, chosen: str, o: base.Options) -> dict[str, Any]:
  del o
  return dict(out[chosen], features=chosen,
              per_features={kd: {k: v for k, v in r.items() if k != 'sweep'}
                            for kd, r in out.items()})


def _rows(name: str, e: dict[str, Any]) -> list[tuple[Any, ...]]:
  return [(f'{name} {"*" if kind == e["features"] else " "}', kind, r['top1'], r['top5'],
           f'   lr={r["best_lr"]:g} wd={r["best_wd"]:g}'
           + (f' holdout={r["holdout_top1"]:.2f}' if r['holdout_top1'] is not None else ''))
          for kind, r in e['per_features'].items()]


def _card_rows(name: str, e: dict[str, Any]) -> list[tuple[str, ...]]:
  del name
  return [('linear', e.get('features', ''), base.card_percent(e.get('top1')),
           base.card_percent(e.get('top5')),
           f'lr {base.card_number(e.get("best_lr"))}, wd {base.card_number(e.get("best_wd"))}')]


TYPE = base.Type('linear', _build, check=check_options, entry=_entry, rows=_rows,
                 choose=_choose, card_rows=_card_rows,
                 card_protocol='linear: a softmax classifier on standardised pre-extracted '
                               'features (Adam, cosine lr), its lr and weight decay chosen on a '
                               'held-out part of the train split')
