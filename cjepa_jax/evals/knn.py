"""kNN classification of frozen features (DINO's protocol): the evaluator type 'knn'.

  knn_scores(train_x, train_y, test_x, ...)   vote scores [M, C].
  knn_probe(...)                              top-1 / top-5 (fractions) of the votes.
  TYPE                                        the evaluator: options `k`, `temperature`; logs
                                              {'knn_top1', 'knn_top5'} in a trainer's rows.

The protocol: L2-normalised features, cosine similarity to every training example, the k nearest
(config: 20 in every recipe) vote for their class with weight exp(sim / T) (T = 0.07); top-1 /
top-5 of the summed votes. The training rows are split over the mesh, so no device holds the
similarities to all of them.
"""

from __future__ import annotations

from collections.abc import Callable
import functools
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
import numpy as np

from cjepa_jax import sharding
from cjepa_jax.evals import base
from cjepa_jax.evals import features as features_lib
from cjepa_jax.evals import units

_put = features_lib.from_host  # Host rows -> mesh.

# Test examples per jitted call, and the multiple the training rows are padded to (static shapes:
# a few unreadable images don't change the compiled shapes).
KNN_QUERY_CHUNK = 256
_KNN_ROW_MULTIPLE = 64


@functools.lru_cache(maxsize=16)
def _knn_fn(mesh: Mesh, num_classes: int, k: int, temperature: float) -> Callable:
  """jit(queries [b, F], train [N, F], labels [N], valid [N]) -> vote scores [b, C].

  The training rows are split over every device of `mesh`: each device keeps its own top-k
  neighbours, the candidates (devices x k) are gathered and the global top-k taken from them, so
  no device ever holds the [b, N] similarities of all N rows. Cached per (mesh, C, k, T): the
  trainer's periodic kNN compiles once.
  """
  axes = sharding.BATCH_AXES

  def local(queries, train, labels, valid):
    sims = jnp.dot(queries, train.T, precision=jax.lax.Precision.HIGHEST)     # [b, n_local]
    sims = jnp.where(valid[None, :], sims, -jnp.inf)
    k_local = min(k, train.shape[0])
    vals, idx = jax.lax.top_k(sims, k_local)                                 # [b, k_local]
    vals = jax.lax.all_gather(vals, axes, axis=1, tiled=True)                # [b, d * k_local]
    labs = jax.lax.all_gather(labels[idx], axes, axis=1, tiled=True)
    vals, pick = jax.lax.top_k(vals, min(k, vals.shape[1]))
    labs = jnp.take_along_axis(labs, pick, axis=1)
    # Rows that are padding carry -inf: weight exactly 0.
    weights = jnp.where(jnp.isfinite(vals), jnp.exp(vals / temperature), 0.0)
    return jnp.sum(weights[..., None] * jax.nn.one_hot(labs, num_classes), axis=1)  # [b, C]

  rows = P(axes)
  fn = jax.shard_map(local, mesh=mesh, in_specs=(P(), rows, rows, rows), out_specs=P(),
                     check_vma=False)
  return jax.jit(fn)


def _l2_normalize(x: np.ndarray) -> np.ndarray:
  x = np.asarray(x, np.float32)
  return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def knn_scores(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, *,
               num_classes: int, k: int = 20, temperature: float = 0.07,
               mesh: Mesh | None = None) -> np.ndarray:
  """Temperature-weighted kNN votes (DINO): `[M, C]` float32 scores for `test_x [M, F]`.

  score[i, c] = sum over the k training rows j most cosine-similar to test row i with label c of
  exp(cos(x_i, x_j) / temperature). Similarities in float32 at HIGHEST matmul precision.
  """
  if k < 1 or temperature <= 0:
    raise ValueError(f'kNN needs k >= 1 and temperature > 0, got k={k}, T={temperature}.')
  if train_x.ndim != 2 or test_x.ndim != 2 or train_x.shape[1] != test_x.shape[1]:
    raise ValueError(f'kNN needs train [N, F] and test [M, F] features, got {train_x.shape} and '
                     f'{test_x.shape}.')
  mesh = mesh or features_lib.single_device_mesh()
  n, m = train_x.shape[0], test_x.shape[0]
  multiple = mesh.size * _KNN_ROW_MULTIPLE
  n_pad = -(-n // multiple) * multiple
  train = np.zeros((n_pad, train_x.shape[1]), np.float32)
  train[:n] = _l2_normalize(train_x)
  labels = np.zeros((n_pad,), np.int32)
  labels[:n] = train_y
  valid = np.arange(n_pad) < n
  rows = NamedSharding(mesh, P(sharding.BATCH_AXES))
  train, labels, valid = (_put(a, rows) for a in (train, labels, valid))
  fn = _knn_fn(mesh, int(num_classes), int(k), float(temperature))
  queries = _l2_normalize(test_x)
  replicated = sharding.replicated(mesh)
  scores = []
  for start in range(0, m, KNN_QUERY_CHUNK):
    chunk = np.zeros((KNN_QUERY_CHUNK, queries.shape[1]), np.float32)
    part = queries[start:start + KNN_QUERY_CHUNK]
    chunk[:len(part)] = part
    out = fn(_put(chunk, replicated), train, labels, valid)
    scores.append(features_lib.to_host(out)[:len(part)])
  return np.concatenate(scores) if scores else np.zeros((0, num_classes), np.float32)


def knn_probe(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, test_y: np.ndarray,
              *, num_classes: int, k: int = 20, temperature: float = 0.07,
              mesh: Mesh | None = None) -> dict[str, Any]:
  """kNN top-1 / top-5 (fractions) of `test_x [M, F]` against `train_x [N, F]`."""
  features_lib.check_labels(train_y, num_classes, 'Training')
  features_lib.check_labels(test_y, num_classes, 'Test')
  scores = knn_scores(train_x, train_y, test_x, num_classes=num_classes, k=k,
                      temperature=temperature, mesh=mesh)
  top1 = float(np.mean(np.argmax(scores, axis=1) == test_y))
  top5 = float(np.mean(features_lib.topk_correct(jnp.asarray(scores), jnp.asarray(test_y), 5)))
  return dict(top1=top1, top5=top5, k=int(k), temperature=float(temperature))


# ------------------------------------------------------------------------------------------------
# The evaluator.
# ------------------------------------------------------------------------------------------------


def _check(name: str, o: base.Options) -> None:
  base.check(isinstance(o.k, int) and o.k >= 1, name, 'k', o.k, 'must be an integer >= 1')
  base.check(isinstance(o.temperature, (int, float)) and o.temperature > 0, name, 'temperature',
             o.temperature, 'must be > 0')


def _build(ctx: base.Context, o: base.Options) -> base.Evaluator:
  """{kind: `knn_probe` result} per feature kind of the context."""
  return base.per_kind(ctx, functools.partial(
      knn_probe, num_classes=int(ctx.data.num_classes), k=int(o.k),
      temperature=float(o.temperature), mesh=ctx.mesh))


def _logged(out: base.Results) -> dict[str, Any]:
  (r,) = out.values()
  return units.monitor_to_percent({'knn_top1': r['top1'], 'knn_top5': r['top5']})


def _entry(out: base.Results, chosen: str, o: base.Options) -> dict[str, Any]:
  return dict(top1=out[chosen]['top1'], top5=out[chosen]['top5'], k=int(o.k),
              temperature=float(o.temperature), features=chosen,
              per_features={kd: dict(top1=r['top1'], top5=r['top5']) for kd, r in out.items()})


def _rows(name: str, e: dict[str, Any]) -> list[tuple[Any, ...]]:
  return [(f'{name} k={e["k"]} T={e["temperature"]:g} {"*" if kind == e["features"] else " "}',
           kind, r['top1'], r['top5'], '') for kind, r in e['per_features'].items()]


def _card_rows(name: str, e: dict[str, Any]) -> list[tuple[str, ...]]:
  del name
  return [(f'kNN (k={e.get("k")}, T={e.get("temperature")})', e.get('features', ''),
           base.card_percent(e.get('top1')), base.card_percent(e.get('top5')), '')]


TYPE = base.Type('knn', _build, check=_check, logged=_logged, entry=_entry, rows=_rows,
                 card_rows=_card_rows,
                 card_protocol='kNN: cosine similarity to every train image, the k nearest vote '
                               'with weight exp(sim / T)')
