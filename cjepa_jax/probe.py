r"""Linear and kNN probes of a frozen encoder restored from an orbax checkpoint (or random).

  python -m cjepa_jax.probe --config configs/probe_linear.py \
      --config.pretrained=runs/cifar10_ijepa --workdir runs/cifar10_ijepa/probe

(also installed as `cjepa-probe`). `--config.pretrained` is a pretraining workdir (its latest
complete checkpoint), one checkpoint step directory (`DIR/checkpoints/<step>`), or the word
`random`: a randomly initialised encoder of the probe config's `model.*`, the baseline every table
of results needs. Prints a table and writes `DIR/probe_results.json`; every accuracy there is a
FRACTION in [0, 1].

What is restored: only the encoder weights, `target_params` (the EMA target encoder, the one the
paper evaluates) with `--config.encoder=target` (default) or `params/encoder` (the context encoder)
with `--config.encoder=context`, plus the model config saved with the checkpoint (variant, depth,
dtype, scan layout and the pretraining `data.image_size`, which the probe then uses). Never the
predictor or the optimizer state. Parameters are replicated over the mesh; batches are split over
every device.

Protocol (the I-JEPA paper's, after MSN / DINO, with the deviations marked):
  * Labels: before anything is restored, the train and eval splits must have the same classes in
    the same order, at least 2, and `data.num_classes` of them (see
    `input_pipeline.check_label_splits`); otherwise label ids would silently mean different
    classes.
  * Features of the frozen encoder on the evaluation preprocessing (resize the short side, centre
    crop, normalise), extracted once per split by one jitted, batch-sharded function. The padded
    rows of the last batch (`valid = False`) are dropped.
  * 'last': the average-pooled final tokens (after the encoder's final LayerNorm). 'last4': the
    concatenation of the last 4 blocks' outputs, each passed through the encoder's final LayerNorm
    (DINO's `get_intermediate_layers` convention, which MSN and I-JEPA follow) and then
    average-pooled ([B, 4D]). An encoder shallower than 4 blocks uses all its blocks. 'both' runs
    both and reports the better one, chosen on the held-out part of the TRAIN split (the paper
    reports the better of the two without saying on what; we never select on the test split).
  * Linear probe: a linear softmax classifier on the standardised features (mean / std of the
    training examples it is fitted on), zero-initialised, Adam with a cosine decay of the learning
    rate to 0, an L2 penalty `wd / 2 * |W|^2` on the kernel (coupled, i.e. added to the gradient;
    `wd` is the regularisation strength of a logistic regression, independent of the learning
    rate), minibatches of `linear.batch_size` for `linear.epochs` epochs. Every (lr, wd) of the
    grid is trained at once (vmapped). The best is chosen by top-1 accuracy (ties: lower loss) on
    a random `linear.holdout_fraction` of the train split that the sweep does not train on; with
    `linear.retrain` (default) that (lr, wd) is then retrained on the whole train split and
    evaluated once on the test split. Deviation: the paper (like DINO / MSN) trains the linear
    head on augmented crops through the frozen encoder; pre-extracted centre-crop features are far
    cheaper and typically score slightly lower.
  * kNN (DINO's protocol): L2-normalised features, cosine similarity to every training example,
    the k = 20 nearest vote for their class with weight exp(sim / T), T = 0.07; top-1 / top-5 of
    the summed votes. It uses the features the linear probe chose ('last' or 'last4');
    `knn.per_features` reports each kind.

For the trainer: `make_knn_evaluator(config, mesh, encoder)` returns `evaluate(encoder_params) ->
{'knn_top1', 'knn_top5'}` on `config.evals.knn_train_examples` / `knn_eval_examples` examples.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
import functools
import json
import os
import sys
from typing import Any

from absl import app
from absl import flags
from absl import logging
from etils import epath
import flax.linen as nn
import jax
from jax.experimental import multihost_utils
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
import ml_collections
from ml_collections import config_flags
import numpy as np
import optax

from cjepa_jax import checkpoint as checkpoint_lib
from cjepa_jax import cli
from cjepa_jax import distributed  # Defines the multi-process flags that `run_main` reads.
from cjepa_jax import sharding
from cjepa_jax import train_step as step_lib
from cjepa_jax.models import vit

Params = Any
Features = dict[str, np.ndarray]

FEATURE_KINDS = ('last', 'last4')
FEATURE_CHOICES = ('last', 'last4', 'both')
# Where each encoder lives in the train state (cjepa_jax/train_step.py).
ENCODER_KEYS = {'target': ('target_params',), 'context': ('params', 'encoder')}
RANDOM = 'random'
RESULTS_FILE = 'probe_results.json'
LAST_N_BLOCKS = 4
# kNN: test examples per jitted call, and the multiple the training rows are padded to (static
# shapes: a few unreadable images don't change the compiled shapes).
KNN_QUERY_CHUNK = 256
_KNN_ROW_MULTIPLE = 64


# ------------------------------------------------------------------------------------------------
# The encoder: building, restoring, features.
# ------------------------------------------------------------------------------------------------


def encoder_from_model_config(model: Mapping[str, Any]) -> vit.Encoder:
  """An inference Encoder from a `model.*` config (a ConfigDict or a checkpoint's saved dict).

  Keeps the variant, depth override, compute dtype and `scan` (it fixes the parameter layout);
  remat is irrelevant without gradients.
  """
  return vit.Encoder(variant=model['variant'], depth=int(model.get('depth', 0)) or None,
                     dtype=step_lib.compute_dtype(model.get('dtype', 'float32')),
                     scan=bool(model.get('scan', False)))


def _abstract_params(encoder: vit.Encoder, image_size: int) -> Params:
  images = jax.ShapeDtypeStruct((1, image_size, image_size, 3), jnp.float32)
  return jax.eval_shape(lambda x: encoder.init(jax.random.key(0), x)['params'], images)


def _check_params(encoder: vit.Encoder, params: Params, image_size: int, where: str) -> None:
  """ValueError when `params` does not fit `encoder` (a checkpoint of another model)."""
  want = _abstract_params(encoder, image_size)
  got_shapes = jax.tree.map(lambda x: tuple(x.shape), params)
  want_shapes = jax.tree.map(lambda x: tuple(x.shape), want)
  if got_shapes != want_shapes:
    raise ValueError(
        f'The encoder parameters of {where} do not match a {encoder.variant} encoder of depth '
        f'{encoder.num_layers} (scan={encoder.scan}) as its saved config says; the checkpoint '
        'and its config/ item disagree. Restore a checkpoint written by cjepa_jax.train.')


def restore_encoder(config: ml_collections.ConfigDict, mesh: Mesh
                    ) -> tuple[vit.Encoder, Params, dict[str, Any]]:
  """The encoder and its parameters (replicated over `mesh`) that `config.pretrained` names.

  Returns:
    (encoder, params, info) with info = dict(checkpoint=<step dir> or 'random', step=int or None,
    encoder='target' | 'context' | None, image_size=int, model=dict of the model config used).
  """
  replicated = sharding.replicated(mesh)
  if config.pretrained == RANDOM:
    model = config.model.to_dict()
    image_size = int(config.data.image_size)
    encoder = encoder_from_model_config(model)
    images = jnp.zeros((1, image_size, image_size, 3), jnp.float32)
    init = jax.jit(lambda: encoder.init(jax.random.key(config.seed), images)['params'],
                   out_shardings=replicated)
    info = dict(checkpoint=RANDOM, step=None, encoder=None)
    params = init()
  else:
    root, step = checkpoint_lib.resolve_checkpoint(config.pretrained)
    step_dir = str(epath.Path(root) / str(step))
    saved = checkpoint_lib.load_config(step_dir)
    model = saved['model']
    image_size = int(saved['data']['image_size'])
    encoder = encoder_from_model_config(model)
    params = checkpoint_lib.restore_subtree(step_dir, ENCODER_KEYS[config.encoder],
                                            sharding=replicated)
    _check_params(encoder, params, image_size, step_dir)
    info = dict(checkpoint=step_dir, step=int(step), encoder=config.encoder)
  keep = ('variant', 'depth', 'dtype', 'scan')
  info.update(image_size=image_size, model={k: model[k] for k in keep if k in model})
  return encoder, params, info


def pooled_features(encoder: vit.Encoder, params: Params, images: jax.Array,
                    kinds: Sequence[str]) -> dict[str, jax.Array]:
  """Average-pooled features of `images [B, H, W, 3]`: {'last': [B, D], 'last4': [B, n*D]}.

  'last' pools the encoder's output (final LayerNorm applied). 'last4' applies the final LayerNorm
  (the encoder's own `norm` parameters) to each of the last n = min(4, depth) block outputs, pools
  each over the tokens and concatenates them, oldest block first. Pooling runs in float32.
  """
  unknown = set(kinds) - set(FEATURE_KINDS)
  if unknown:
    raise ValueError(f'Unknown feature kinds {sorted(unknown)}; use {FEATURE_KINDS}.')
  if 'last4' in kinds:
    out, inter = encoder.apply({'params': params}, images, return_intermediates=True)
  else:  # No [depth, B, N, D] stack of block outputs when only the last one is needed.
    out, inter = encoder.apply({'params': params}, images), None
  feats = {}
  if 'last' in kinds:
    feats['last'] = jnp.mean(out.astype(jnp.float32), axis=1)
  if 'last4' in kinds:
    norm = nn.LayerNorm(epsilon=vit.LN_EPS, dtype=jnp.float32)
    blocks = norm.apply({'params': params['norm']}, inter[-LAST_N_BLOCKS:].astype(jnp.float32))
    pooled = jnp.mean(blocks, axis=2)                             # [n, B, D]
    feats['last4'] = jnp.concatenate(list(pooled), axis=-1)       # [B, n*D]
  return feats


def make_feature_fn(encoder: vit.Encoder, kinds: Sequence[str]
                    ) -> Callable[[Params, dict[str, jax.Array]], dict[str, jax.Array]]:
  """jit(batch -> pooled features + label + valid), compiled once per batch shape and sharding.

  The parameters keep whatever sharding they arrive with (replicated in the probe, FSDP in the
  trainer); the batch is the one `to_global_array` places over the mesh.
  """
  kinds = tuple(kinds)
  if encoder.num_layers < LAST_N_BLOCKS and 'last4' in kinds:
    logging.warning("The encoder has %d blocks (< %d): 'last4' concatenates all of them.",
                    encoder.num_layers, LAST_N_BLOCKS)

  @jax.jit
  def features(params, batch):
    out = pooled_features(encoder, params, batch['image'], kinds)
    out.update(label=batch['label'], valid=batch['valid'])
    return out

  return features


def extract_features(feature_fn: Callable, params: Params, config: ml_collections.ConfigDict,
                     split: str, *, mesh: Mesh, batch_size: int,
                     num_examples: int | None = None) -> tuple[Features, np.ndarray]:
  """One pass of the eval pipeline over `split`: (features {kind: [N, F]}, labels [N]) on host.

  Every process gets all N rows (gathered from the processes); padded rows are dropped. One batch
  stays in flight while the previous one is fetched, so the device never waits for the host.
  Call on every process (collectives).
  """
  from cjepa_jax import input_pipeline  # pylint: disable=g-import-not-at-top  (TF: host only)

  data_sharding = sharding.batch_sharding(mesh)
  it = input_pipeline.make_eval_iterator(config, split, batch_size=batch_size,
                                         num_examples=num_examples)
  chunks: list[dict[str, np.ndarray]] = []

  def fetch(out):
    host = jax.tree.map(to_host, out)
    valid = np.asarray(host.pop('valid'), bool)
    chunks.append({k: np.asarray(v)[valid] for k, v in host.items()})

  pending = None
  for batch in it:
    batch.pop('data_skipped', None)
    out = feature_fn(params, input_pipeline.to_global_array(batch, data_sharding))
    if pending is not None:
      fetch(pending)
    pending = out
  if pending is not None:
    fetch(pending)
  if not chunks or not sum(len(c['label']) for c in chunks):
    raise ValueError(f'Split {split!r} of {config.data.dataset!r} gave no examples.')
  merged = {k: np.concatenate([c[k] for c in chunks]) for k in chunks[0]}
  labels = merged.pop('label').astype(np.int32)
  return {k: v.astype(np.float32) for k, v in merged.items()}, labels


# ------------------------------------------------------------------------------------------------
# Shared helpers.
# ------------------------------------------------------------------------------------------------


def _single_device_mesh() -> Mesh:
  return Mesh(np.asarray(jax.devices()[:1]).reshape(1, 1), sharding.MESH_AXES)


def to_host(x: jax.Array) -> np.ndarray:
  """The whole value of a global jax.Array as numpy, on every process (gathered if need be)."""
  if x.is_fully_addressable:
    return np.asarray(x)
  return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def _put(x: np.ndarray, sharding_: jax.sharding.Sharding) -> jax.Array:
  """A host array that every process holds in full -> a global jax.Array laid out by sharding_."""
  return jax.make_array_from_callback(x.shape, sharding_, lambda index: x[index])


def _topk_correct(scores: jax.Array, labels: jax.Array, k: int) -> jax.Array:
  """Whether `labels [B]` is among the k highest `scores [..., B, C]`: bool [..., B]."""
  top = jax.lax.top_k(scores, min(k, scores.shape[-1]))[1]
  return jnp.any(top == labels[:, None], axis=-1)


def _check_labels(labels: np.ndarray, num_classes: int, what: str) -> None:
  if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
    raise ValueError(f'{what} labels span [{labels.min()}, {labels.max()}] but num_classes = '
                     f'{num_classes}; set config.data.num_classes to the dataset\'s class count.')


# ------------------------------------------------------------------------------------------------
# kNN.
# ------------------------------------------------------------------------------------------------


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
  mesh = mesh or _single_device_mesh()
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
    scores.append(to_host(out)[:len(part)])
  return np.concatenate(scores) if scores else np.zeros((0, num_classes), np.float32)


def knn_probe(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, test_y: np.ndarray,
              *, num_classes: int, k: int = 20, temperature: float = 0.07,
              mesh: Mesh | None = None) -> dict[str, Any]:
  """kNN top-1 / top-5 (fractions) of `test_x [M, F]` against `train_x [N, F]`."""
  _check_labels(train_y, num_classes, 'Training')
  _check_labels(test_y, num_classes, 'Test')
  scores = knn_scores(train_x, train_y, test_x, num_classes=num_classes, k=k,
                      temperature=temperature, mesh=mesh)
  top1 = float(np.mean(np.argmax(scores, axis=1) == test_y))
  top5 = float(np.mean(_topk_correct(jnp.asarray(scores), jnp.asarray(test_y), 5)))
  return dict(top1=top1, top5=top5, k=int(k), temperature=float(temperature))


# ------------------------------------------------------------------------------------------------
# Linear probe.
# ------------------------------------------------------------------------------------------------


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
    top5 = _topk_correct(logits, y, 5)
    return (jnp.sum(w * top1, axis=1), jnp.sum(w * top5, axis=1), jnp.sum(w * ce, axis=1))

  return jax.jit(evaluate, out_shardings=sharding.replicated(mesh))


def _batches(idx: np.ndarray, batch_size: int, rng: np.random.Generator | None
             ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
  """(rows [batch_size], weights [batch_size]) covering idx once; the last batch padded (w = 0)."""
  order = idx if rng is None else rng.permutation(idx)
  for start in range(0, len(order), batch_size):
    rows = order[start:start + batch_size]
    w = np.zeros(batch_size, np.float32)
    w[:len(rows)] = 1.0
    yield np.pad(rows, (0, batch_size - len(rows))), w


def _linear_batch_size(requested: int, n: int, mesh: Mesh) -> int:
  """`requested` (0: full batch), rounded up to a multiple of the device count, at most ~n."""
  size = requested if 0 < requested < n else n
  return -(-size // mesh.size) * mesh.size


def train_linear(x: np.ndarray, y: np.ndarray, idx: np.ndarray, mean: np.ndarray,
                 std: np.ndarray, *, num_classes: int, lrs: Sequence[float],
                 wds: Sequence[float], epochs: int, batch_size: int, seed: int,
                 mesh: Mesh) -> Params:
  """Trains one linear classifier per (lrs[g], wds[g]) on rows `idx` of x: params with [G, ...]."""
  batch = _linear_batch_size(batch_size, len(idx), mesh)
  total_steps = epochs * -(-len(idx) // batch)
  init, step = _linear_train_fns(mesh, total_steps)
  replicated = sharding.replicated(mesh)
  data = sharding.batch_sharding(mesh)
  lrs_, wds_, mean_, std_ = (_put(np.asarray(a, np.float32), replicated)
                             for a in (lrs, wds, mean, std))
  params, opt_state = init(lrs_, wds_, x.shape[1], int(num_classes))
  rng = np.random.default_rng(seed)
  for _ in range(epochs):
    for rows, w in _batches(idx, batch, rng):
      params, opt_state = step(params, opt_state, lrs_, wds_, mean_, std_, _put(x[rows], data),
                               _put(y[rows], data), _put(w, data))
  return params


def evaluate_linear(params: Params, x: np.ndarray, y: np.ndarray, idx: np.ndarray,
                    mean: np.ndarray, std: np.ndarray, *, batch_size: int, mesh: Mesh
                    ) -> dict[str, np.ndarray]:
  """Top-1 / top-5 accuracy and mean cross-entropy, each `[G]`, of the classifiers on rows idx."""
  batch = _linear_batch_size(batch_size, len(idx), mesh)
  evaluate = _linear_eval_fn(mesh)
  replicated = sharding.replicated(mesh)
  data = sharding.batch_sharding(mesh)
  mean_, std_ = _put(mean, replicated), _put(std, replicated)
  sums = None
  for rows, w in _batches(idx, batch, None):
    out = evaluate(params, mean_, std_, _put(x[rows], data), _put(y[rows], data), _put(w, data))
    out = np.stack([to_host(o).astype(np.float64) for o in out])
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
    dict(top1, top5 (test, fractions), best_lr, best_wd, holdout_top1, holdout_loss, retrained,
    dim, sweep=[dict(lr, wd, holdout_top1, holdout_loss), ...]).
  """
  mesh = mesh or _single_device_mesh()
  lrs, wds = tuple(float(v) for v in lrs), tuple(float(v) for v in wds)
  if not lrs or not wds or min(lrs) <= 0 or min(wds) < 0:
    raise ValueError(f'linear.lrs must be non-empty and > 0 and linear.wds non-empty and >= 0; '
                     f'got {lrs} and {wds}.')
  if epochs < 1:
    raise ValueError(f'linear.epochs={epochs} must be >= 1.')
  if train_x.shape[1] != test_x.shape[1]:
    raise ValueError(f'Train and test features differ in width: {train_x.shape} vs {test_x.shape}.')
  _check_labels(train_y, num_classes, 'Training')
  _check_labels(test_y, num_classes, 'Test')
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
              retrained=bool(retrained), dim=int(train_x.shape[1]), sweep=sweep)


# ------------------------------------------------------------------------------------------------
# The periodic kNN of the trainer.
# ------------------------------------------------------------------------------------------------


def make_knn_evaluator(config: ml_collections.ConfigDict, mesh: Mesh, encoder: vit.Encoder
                       ) -> Callable[[Params], dict[str, float]]:
  """kNN monitor for pretraining: `evaluate(encoder_params) -> {'knn_top1', 'knn_top5'}`.

  Uses the pretraining config: the eval pipeline on `data.train_split` (a fixed subset of
  `evals.knn_train_examples`, 0 = all) and `data.eval_split` (`evals.knn_eval_examples`),
  batches of `evals.knn_batch_size` (default `batch_size`), k = `evals.knn_k` (default 20),
  T = `evals.knn_temperature` (default 0.07), on the 'last' features. The feature extraction and
  the kNN are jitted once and reused by every call; the data are re-read each call (nothing is
  cached on the host). Call it on every process (it runs collectives); the parameters may be
  FSDP-sharded (e.g. `state['target_params']`).

  Raises ValueError at once (not at the first evaluation, hours into a run) when the two splits'
  classes differ or do not match `data.num_classes` (`input_pipeline.check_label_splits`).
  """
  from cjepa_jax import input_pipeline  # pylint: disable=g-import-not-at-top  (TF: host only)

  evals = config.get('evals', ml_collections.ConfigDict())
  batch_size = int(evals.get('knn_batch_size', 0) or config.batch_size)
  sharding.check_batch_divisible(batch_size, mesh, jax.process_count())
  input_pipeline.check_label_splits(config)
  k = int(evals.get('knn_k', 20))
  temperature = float(evals.get('knn_temperature', 0.07))
  n_train = int(evals.get('knn_train_examples', 0)) or None
  n_eval = int(evals.get('knn_eval_examples', 0)) or None
  feature_fn = make_feature_fn(encoder, ('last',))

  def evaluate(params: Params) -> dict[str, float]:
    extract = functools.partial(extract_features, feature_fn, params, config, mesh=mesh,
                                batch_size=batch_size)
    train_f, train_y = extract(config.data.train_split, num_examples=n_train)
    test_f, test_y = extract(config.data.eval_split, num_examples=n_eval)
    result = knn_probe(train_f['last'], train_y, test_f['last'], test_y,
                       num_classes=config.data.num_classes, k=k, temperature=temperature,
                       mesh=mesh)
    return {'knn_top1': result['top1'], 'knn_top5': result['top5']}

  evaluate.feature_fn = feature_fn  # For tests / inspection (its compile count).
  return evaluate


# ------------------------------------------------------------------------------------------------
# The probe run.
# ------------------------------------------------------------------------------------------------


def check_config(config: ml_collections.ConfigDict) -> None:
  """ValueError naming the key and its valid values for a bad probe config."""
  if not config.pretrained:
    raise ValueError('Set --config.pretrained to a pretraining workdir, a checkpoint step '
                     'directory (DIR/checkpoints/<step>) or `random` (the baseline).')
  if config.encoder not in ENCODER_KEYS:
    raise ValueError(f'config.encoder={config.encoder!r}: use one of {sorted(ENCODER_KEYS)}.')
  if config.features not in FEATURE_CHOICES:
    raise ValueError(f'config.features={config.features!r}: use one of {FEATURE_CHOICES}.')
  if config.knn.k < 1 or config.knn.temperature <= 0:
    raise ValueError(f'config.knn.k={config.knn.k} must be >= 1 and config.knn.temperature='
                     f'{config.knn.temperature} > 0.')
  if config.train_examples < 0 or config.eval_examples < 0:
    raise ValueError('config.train_examples / eval_examples must be >= 0 (0 = the whole split).')
  if not 0 <= config.linear.holdout_fraction < 1:
    raise ValueError(f'config.linear.holdout_fraction={config.linear.holdout_fraction} must be '
                     'in [0, 1).')


def _format_table(results: dict[str, Any]) -> str:
  lin, knn = results['linear'], results['knn']
  lines = [f'{"probe":<22}{"features":<10}{"top1":>8}{"top5":>8}']
  for kind, r in lin['per_features'].items():
    mark = '*' if kind == lin['features'] else ' '
    lines.append(f'{"linear " + mark:<22}{kind:<10}{r["top1"]:>8.4f}{r["top5"]:>8.4f}'
                 f'   lr={r["best_lr"]:g} wd={r["best_wd"]:g}'
                 + (f' holdout={r["holdout_top1"]:.4f}' if r['holdout_top1'] is not None else ''))
  for kind, r in knn['per_features'].items():
    mark = '*' if kind == knn['features'] else ' '
    name = f'knn k={knn["k"]} T={knn["temperature"]:g} {mark}'
    lines.append(f'{name:<22}{kind:<10}{r["top1"]:>8.4f}{r["top5"]:>8.4f}')
  head = (f'{results["checkpoint"]} (step {results["step"]}, {results["model"]["variant"]}, '
          f'{results["dataset"]}): accuracies are fractions; * = reported (chosen on the '
          'held-out train split)')
  return '\n'.join([head] + lines)


def probe(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Restores the encoder, extracts features, runs the linear and kNN probes; writes the JSON.

  Returns the results dict that `workdir/probe_results.json` holds (accuracies as fractions).
  """
  from cjepa_jax import input_pipeline  # pylint: disable=g-import-not-at-top  (TF: host only)

  check_config(config)
  # Before restoring or extracting anything: mismatched class folders would give silently wrong
  # accuracies, and a listing is all it takes to find out.
  input_pipeline.check_label_splits(config)
  mesh = sharding.make_mesh(config)
  sharding.check_batch_divisible(config.batch_size, mesh, jax.process_count())
  encoder, params, info = restore_encoder(config, mesh)
  data_config = config.copy_and_resolve_references()
  data_config.data.image_size = info['image_size']  # The resolution the encoder was trained at.
  if info['image_size'] != config.data.image_size:
    logging.info('Using the checkpoint\'s image size %d (the probe config says %d).',
                 info['image_size'], config.data.image_size)
  kinds = FEATURE_KINDS if config.features == 'both' else (config.features,)
  feature_fn = make_feature_fn(encoder, kinds)
  extract = functools.partial(extract_features, feature_fn, params, data_config, mesh=mesh,
                              batch_size=config.batch_size)
  train_f, train_y = extract(config.data.train_split, num_examples=config.train_examples or None)
  test_f, test_y = extract(config.data.eval_split, num_examples=config.eval_examples or None)
  logging.info('Features: %d train / %d test examples, %s.', len(train_y), len(test_y),
               {k: v.shape[1] for k, v in train_f.items()})

  lin_cfg, num_classes = config.linear, int(config.data.num_classes)
  linear = {}
  for kind in kinds:
    linear[kind] = linear_probe(
        train_f[kind], train_y, test_f[kind], test_y, num_classes=num_classes,
        lrs=lin_cfg.lrs, wds=lin_cfg.wds, epochs=lin_cfg.epochs, batch_size=lin_cfg.batch_size,
        holdout_fraction=lin_cfg.holdout_fraction, retrain=lin_cfg.retrain, seed=config.seed,
        mesh=mesh)
  # 'both': the better kind on the held-out train rows (ties: 'last'), never on the test split.
  chosen = min(kinds, key=lambda kd: (-(linear[kd]['holdout_top1'] or 0.0),
                                      linear[kd]['holdout_loss'] or 0.0, kinds.index(kd)))
  knn = {kind: knn_probe(train_f[kind], train_y, test_f[kind], test_y, num_classes=num_classes,
                         k=config.knn.k, temperature=config.knn.temperature, mesh=mesh)
         for kind in kinds}

  results = {
      'linear': dict(linear[chosen], features=chosen,
                     per_features={kd: {k: v for k, v in r.items() if k != 'sweep'}
                                   for kd, r in linear.items()}),
      'knn': dict(top1=knn[chosen]['top1'], top5=knn[chosen]['top5'], k=int(config.knn.k),
                  temperature=float(config.knn.temperature), features=chosen,
                  per_features={kd: dict(top1=r['top1'], top5=r['top5']) for kd, r in knn.items()}),
      'checkpoint': info['checkpoint'],
      'step': info['step'],
      'encoder': info['encoder'],
      'model': info['model'],
      'image_size': info['image_size'],
      'dataset': config.data.dataset,
      'train_split': config.data.train_split,
      'eval_split': config.data.eval_split,
      'num_train': int(len(train_y)),
      'num_test': int(len(test_y)),
      'accuracy_units': 'fraction',
      'config': json.loads(config.to_json_best_effort()),
  }
  if distributed.is_main_process():
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, RESULTS_FILE), 'w', encoding='utf-8') as f:
      json.dump(results, f, indent=2)
    print(_format_table(results))
  return results


# ------------------------------------------------------------------------------------------------
# Command line.
# ------------------------------------------------------------------------------------------------

_FLAGS: dict[str, Any] = {}


def _define_flags() -> None:
  """Defines --config and --workdir on first use, not at import.

  cjepa_jax.train defines flags of the same names at import and will import this module for its
  kNN monitor; absl forbids two modules defining one flag, so the probe's are defined only when
  the probe is the program.
  """
  if not _FLAGS:
    _FLAGS['config'] = config_flags.DEFINE_config_file(
        'config', None, 'Probe config (configs/probe_linear.py[:cifar10|imagenet]).',
        lock_config=True)
    _FLAGS['workdir'] = flags.DEFINE_string(
        'workdir', None, 'Where probe_results.json goes.')


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  config, workdir = _FLAGS['config'].value, _FLAGS['workdir'].value
  if config is None or workdir is None:
    raise app.UsageError('--config and --workdir are required, e.g. --config '
                         'configs/probe_linear.py --config.pretrained=runs/cifar10_ijepa '
                         '--workdir runs/cifar10_ijepa/probe')
  probe(config, workdir)   # Bad input: one line and exit 1 (cli.run).


def run() -> None:
  """Console-script entry point (`cjepa-probe`): flags, jax.distributed start-up, then `main`."""
  _define_flags()
  cli.run('cjepa-probe', main, doc=__doc__, module=sys.argv[0] if __name__ == '__main__'
          else __name__)


if __name__ == '__main__':
  run()
