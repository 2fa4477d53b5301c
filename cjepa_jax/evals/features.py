"""The frozen encoder of an evaluation and its pooled features, on host as numpy.

  EncoderSource.from_config(config) which encoder: `config.pretrained`, `encoder`, and the
                                    `model.*` / `data.image_size` / `seed` of `random`.
  restore_encoder(source, mesh)     (encoder, replicated params, info) that the source names: a
                                    workdir, a checkpoint step directory, or `random`
                                    (= resolve_encoder + load_encoder_params, which fine-tuning
                                    also uses).
  pooled_features(...)              {'last': [B, D], 'last4': [B, n*D], 'tokens': [B, N, D]} of
                                    an image batch.
  make_feature_fn(encoder, kinds)   the jitted batch -> features function.
  extract_features(...)             one pass of the eval pipeline over a split -> ({kind: [N, F]},
                                    labels [N]) on every process.
  FeatureCache                      one extraction per (split, kinds) shared by the evaluators of a
                                    run (extracting CIFAR-10 takes minutes).

Only the encoder weights are restored: `target_params` (the EMA target, the one the paper
evaluates) or `params/encoder` (the context encoder), plus the model config saved with the
checkpoint (variant, depth, dtype, scan layout and the pretraining `data.image_size`). Never the
predictor or the optimizer state.

Also the host <-> mesh helpers the probes share (`to_host`, `from_host`) and their label checks.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
import dataclasses
from typing import Any

from absl import logging
from etils import epath
import flax.linen as nn
import jax
from jax.experimental import multihost_utils
import jax.numpy as jnp
from jax.sharding import Mesh
import ml_collections
import numpy as np

from cjepa_jax.checkpoint import reading as ckpt_reading
from cjepa_jax import metrics as metrics_lib
from cjepa_jax import sharding
from cjepa_jax.data.spec import DataSpec
from cjepa_jax.models import jepa
from cjepa_jax.models import vit

Params = Any
Features = dict[str, np.ndarray]

FEATURE_KINDS = ('last', 'last4')
# The final patch tokens [N_tokens, D] per image, for the attentive probe. Kept on the host as
# float16 (half the memory: 1.2 GB for CIFAR-10's 50,000 x 64 x 192 train tokens).
TOKENS = 'tokens'
ALL_KINDS = FEATURE_KINDS + (TOKENS,)
FEATURE_CHOICES = ('last', 'last4', 'both')   # `config.features` of a probe run.
# Where each encoder lives in the train state (cjepa_jax/train_step.py).
ENCODER_KEYS = {'target': ('target_params',), 'context': ('params', 'encoder')}
RANDOM = 'random'
LAST_N_BLOCKS = 4


def feature_kinds(choice: str) -> tuple[str, ...]:
  """The kinds a `config.features` choice extracts: 'both' -> ('last', 'last4')."""
  return FEATURE_KINDS if choice == 'both' else (choice,)


# ------------------------------------------------------------------------------------------------
# The encoder.
# ------------------------------------------------------------------------------------------------


def _check_params(encoder: vit.Encoder, params: Params, image_size: int, where: str) -> None:
  """ValueError when `params` does not fit `encoder` (a checkpoint of another model)."""
  if jepa.tree_mismatch(params, jepa.abstract_encoder_params(encoder, image_size)) is not None:
    raise ValueError(
        f'The encoder parameters of {where} do not match a {encoder.variant} encoder of depth '
        f'{encoder.num_layers} (scan={encoder.scan}) as its saved config says; the checkpoint '
        'and its config/ item disagree. Restore a checkpoint written by cjepa_jax.train.')


@dataclasses.dataclass(frozen=True)
class EncoderSource:
  """Where an evaluation's or a fine-tuning's encoder comes from (read once from the config)."""
  pretrained: str                 # A workdir, a step directory, a converted checkpoint, 'random'.
  encoder: str = 'target'         # Of a pretraining checkpoint: 'target' (EMA) or 'context'.
  model: Mapping[str, Any] = dataclasses.field(default_factory=dict)  # `model.*` of 'random'.
  image_size: int = 224           # The image size of 'random'.
  seed: int = 0                   # Initialises 'random'.

  @classmethod
  def from_config(cls, config: ml_collections.ConfigDict) -> EncoderSource:
    """Reads `pretrained`, `encoder`, and what a `random` encoder is made of: `model.*`,
    `data.image_size` and `seed` (a config that names a checkpoint may lack them)."""
    model, data = config.get('model'), config.get('data')
    return cls(config.pretrained, config.get('encoder', 'target'),
               model.to_dict() if model is not None else {},
               int(data.image_size) if data is not None else 0, config.get('seed', 0))


def resolve_encoder(source: EncoderSource) -> tuple[vit.Encoder, dict[str, Any]]:
  """The encoder module that `source.pretrained` names, and where its weights are; reads no
  weights.

  `random`: the source's own `model` at its `image_size`. A checkpoint (a workdir, its
  `checkpoints/` dir or one step directory) brings its saved model config (variant, depth,
  dtype, scan) and its pretraining `data.image_size`.

  Returns:
    (encoder, info) with info = dict(checkpoint=<step dir> or 'random', step=int or None,
    encoder='target' | 'context' | None, image_size=int, model=dict of the model config used).
  """
  if source.pretrained == RANDOM:
    model = dict(source.model)
    image_size = int(source.image_size)
    info = dict(checkpoint=RANDOM, step=None, encoder=None)
  else:
    root, step = ckpt_reading.resolve_checkpoint(source.pretrained)
    step_dir = str(epath.Path(root) / str(step))
    saved = ckpt_reading.load_config(step_dir)
    model = saved['model']
    image_size = int(saved['data']['image_size'])
    which = source.encoder
    if 'finetune_source' in saved and which != 'context':
      # A fine-tuning checkpoint (cjepa-finetune) has one encoder, under params/encoder: the
      # default `target` names pretraining's EMA copy, which it has not.
      origin = saved['finetune_source'] or {}
      raise ValueError(
          f'{step_dir} is a fine-tuning checkpoint (cjepa-finetune): it has no EMA target encoder '
          f'(--config.encoder={which}). Probe its fine-tuned encoder with --config.encoder='
          'context, or the pretrained encoder it started from with --config.pretrained='
          f'{origin.get("checkpoint") or "its pretraining workdir"}.')
    if 'finetune_source' in saved:
      logging.info('%s is a fine-tuning checkpoint: its fine-tuned encoder (params/encoder) is '
                   'restored.', step_dir)
    elif which == 'target' and saved.get('use_ema', True) is False:
      # Pretrained without EMA: the target was the online encoder itself (no second copy).
      logging.info('%s was pretrained without EMA (use_ema=False): its target encoder is the '
                   'context encoder, which is restored.', step_dir)
      which = 'context'
    info = dict(checkpoint=step_dir, step=int(step), encoder=which)
  keep = ('variant', 'depth', 'dtype', 'scan')
  info.update(image_size=image_size, model={k: model[k] for k in keep if k in model})
  return jepa.encoder_from_model_config(model), info


def load_encoder_params(seed: int, encoder: vit.Encoder, info: dict[str, Any],
                        sharding_: jax.sharding.Sharding) -> Params:
  """The weights `resolve_encoder` located, placed with `sharding_`.

  `random`: `encoder.init` with `seed` at `info['image_size']`; a checkpoint:
  `ENCODER_KEYS[info['encoder']]` of its train state (the source's `encoder`, or 'context' for a
  run pretrained without EMA), checked against `encoder`'s shapes.
  """
  if info['checkpoint'] == RANDOM:
    size = int(info['image_size'])
    images = jnp.zeros((1, size, size, 3), jnp.float32)
    init = jax.jit(lambda: encoder.init(jax.random.key(seed), images)['params'],
                   out_shardings=sharding_)
    return init()
  params = ckpt_reading.restore_subtree(info['checkpoint'], ENCODER_KEYS[info['encoder']],
                                        sharding=sharding_)
  _check_params(encoder, params, int(info['image_size']), info['checkpoint'])
  return params


def restore_encoder(source: EncoderSource, mesh: Mesh
                    ) -> tuple[vit.Encoder, Params, dict[str, Any]]:
  """The encoder and its parameters (replicated over `mesh`) that `source.pretrained` names.

  `random` initialises the source's `model` at its `image_size` with its `seed`; a checkpoint
  brings its own model config and image size, and `source.encoder` picks
  `ENCODER_KEYS[source.encoder]` from its train state (`resolve_encoder`,
  `load_encoder_params`).

  Returns:
    (encoder, params, info), info as `resolve_encoder`'s.
  """
  encoder, info = resolve_encoder(source)
  return encoder, load_encoder_params(source.seed, encoder, info, sharding.replicated(mesh)), info


# ------------------------------------------------------------------------------------------------
# Features.
# ------------------------------------------------------------------------------------------------


def pooled_features(encoder: vit.Encoder, params: Params, images: jax.Array,
                    kinds: Sequence[str]) -> dict[str, jax.Array]:
  """Average-pooled features of `images [B, H, W, 3]`: {'last': [B, D], 'last4': [B, n*D]}.

  'last' pools the encoder's output (final LayerNorm applied); 'tokens' is that output unpooled
  ([B, N, D], float32). 'last4' applies the final LayerNorm
  (the encoder's own `norm` parameters) to each of the last n = min(4, depth) block outputs, pools
  each over the tokens and concatenates them, oldest block first (DINO's
  `get_intermediate_layers` convention, which MSN and I-JEPA follow). Pooling runs in float32.
  """
  unknown = set(kinds) - set(ALL_KINDS)
  if unknown:
    raise ValueError(f'Unknown feature kinds {sorted(unknown)}; use {ALL_KINDS}.')
  if 'last4' in kinds:
    out, inter = encoder.apply({'params': params}, images, return_intermediates=True)
  else:  # No [depth, B, N, D] stack of block outputs when only the last one is needed.
    out, inter = encoder.apply({'params': params}, images), None
  feats = {}
  if 'last' in kinds:
    feats['last'] = jnp.mean(out.astype(jnp.float32), axis=1)
  if TOKENS in kinds:
    feats[TOKENS] = out.astype(jnp.float32)
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
    out.update(label=batch['label'], valid=batch['valid'], pos=batch['pos'])
    return out

  return features


def extract_features(feature_fn: Callable, params: Params, data: DataSpec,
                     split: str, *, mesh: Mesh, batch_size: int,
                     num_examples: int | None = None, progress: bool = False
                     ) -> tuple[Features, np.ndarray]:
  """One pass of the eval pipeline over `split`: (features {kind: [N, F]}, labels [N]) on host.

  The eval preprocessing (resize the short side, centre crop, normalise) at
  `data.image_size`. Every process gets all N rows (gathered from the processes), in the
  split's order whatever the number of processes; the padded rows of the last batch
  (`valid = False`) are dropped. One batch stays in flight while
  the previous one is fetched, so the device never waits for the host. 'tokens' are kept as
  float16. With `progress`, the main process logs a progress line about every 20 s. Call on every
  process (collectives).
  """
  from cjepa_jax.data import input_pipeline  # pylint: disable=g-import-not-at-top  (TF: host only)

  data_sharding = sharding.batch_sharding(mesh)
  it = input_pipeline.make_eval_iterator(data, split, batch_size=batch_size,
                                         num_examples=num_examples)
  total = num_examples or (input_pipeline.num_examples(data, split) if progress else None)
  chunks: list[dict[str, np.ndarray]] = []
  meter = metrics_lib.Progress(f'features of {split!r}', total, enabled=progress)

  def fetch(out):
    host = jax.tree.map(to_host, out)
    valid = np.asarray(host.pop('valid'), bool)
    chunk = {k: np.asarray(v)[valid] for k, v in host.items()}
    if TOKENS in chunk:
      chunk[TOKENS] = chunk[TOKENS].astype(np.float16)
    chunks.append(chunk)
    meter.update(len(chunk['label']))

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
    raise ValueError(f'Split {split!r} of {data.dataset!r} gave no examples.')
  merged = {k: np.concatenate([c[k] for c in chunks]) for k in chunks[0]}
  # Rows in split order, whatever the number of processes (each reads every P-th example, and
  # the gather concatenates the processes' parts): the seeded holdouts, minibatches and shot
  # draws of the probes then pick the same examples as with one process.
  order = np.argsort(merged.pop('pos'), kind='stable')
  merged = {k: v[order] for k, v in merged.items()}
  labels = merged.pop('label').astype(np.int32)
  meter.done()
  return {k: v if k == TOKENS else v.astype(np.float32) for k, v in merged.items()}, labels


class FeatureCache:
  """The features of ONE parameters object, extracted once per (split, kinds) and then shared.

  The evaluators of a probe run (linear, kNN) read the same arrays, and extracting them is the
  slow part (minutes on CIFAR-10), so the runner builds one cache and hands it to every
  evaluator. A call with another parameters object drops everything cached: features of old
  parameters must never answer for new ones.
  """

  def __init__(self, encoder: vit.Encoder, data: DataSpec, mesh: Mesh, *,
               batch_size: int, num_examples: Mapping[str, int | None] | None = None,
               progress: bool = False):
    """`data` gives the splits and their preprocessing (image size included); `num_examples`:
    per split (absent or None: the whole split); `progress`: log extraction progress."""
    self.encoder = encoder
    self.progress = progress
    self.data = data
    self.mesh = mesh
    self.batch_size = int(batch_size)
    self.num_examples = dict(num_examples or {})
    self._fns: dict[tuple[str, ...], Callable] = {}
    self._params: Params = None
    self._cache: dict[tuple[str, tuple[str, ...]], tuple[Features, np.ndarray]] = {}

  @classmethod
  def for_probe(cls, encoder: vit.Encoder, data: DataSpec, mesh: Mesh, *, train_examples: int,
                eval_examples: int) -> FeatureCache:
    """A probe run's: batches of `data.batch_size`; `train_examples` / `eval_examples` of the
    train / eval split (0: all); progress logged."""
    return cls(encoder, data, mesh, batch_size=data.batch_size, num_examples={
        data.train_split: int(train_examples) or None,
        data.eval_split: int(eval_examples) or None}, progress=True)

  def feature_fn(self, kinds: Sequence[str]) -> Callable:
    """The jitted feature function of `kinds` (one per kinds, so one compile per shape)."""
    kinds = tuple(kinds)
    if kinds not in self._fns:
      self._fns[kinds] = make_feature_fn(self.encoder, kinds)
    return self._fns[kinds]

  def get(self, params: Params, split: str, kinds: Sequence[str]
          ) -> tuple[Features, np.ndarray]:
    """(features {kind: [N, F]}, labels [N]) of `split` under `params`; extracted on first use.

    An earlier extraction of more kinds answers for fewer (the runner extracts the union of what
    its evaluators need in one pass). Call on every process (the first call per key runs
    collectives).
    """
    if params is not self._params:
      self._params, self._cache = params, {}
    kinds = tuple(kinds)
    for (cached_split, cached_kinds), (feats, labels) in self._cache.items():
      if cached_split == split and set(kinds) <= set(cached_kinds):
        return {k: feats[k] for k in kinds}, labels
    key = (split, kinds)
    self._cache[key] = extract_features(
        self.feature_fn(kinds), params, self.data, split, mesh=self.mesh,
        batch_size=self.batch_size, num_examples=self.num_examples.get(split),
        progress=self.progress)
    return self._cache[key]


# ------------------------------------------------------------------------------------------------
# Host <-> mesh and labels, shared by the probes.
# ------------------------------------------------------------------------------------------------


def single_device_mesh() -> Mesh:
  """A 1 x 1 mesh of the first device: the probes' default when no mesh is given."""
  return Mesh(np.asarray(jax.devices()[:1]).reshape(1, 1), sharding.MESH_AXES)


def to_host(x: jax.Array) -> np.ndarray:
  """The whole value of a global jax.Array as numpy, on every process (gathered if need be)."""
  if x.is_fully_addressable:
    return np.asarray(x)
  return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def from_host(x: np.ndarray, sharding_: jax.sharding.Sharding) -> jax.Array:
  """A host array that every process holds in full -> a global jax.Array laid out by sharding_."""
  return jax.make_array_from_callback(x.shape, sharding_, lambda index: x[index])


def topk_correct(scores: jax.Array, labels: jax.Array, k: int) -> jax.Array:
  """Whether `labels [B]` is among the k highest `scores [..., B, C]`: bool [..., B]."""
  top = jax.lax.top_k(scores, min(k, scores.shape[-1]))[1]
  return jnp.any(top == labels[:, None], axis=-1)


def check_labels(labels: np.ndarray, num_classes: int, what: str) -> None:
  """ValueError naming `config.data.num_classes` when `labels [N]` leave [0, num_classes)."""
  if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
    raise ValueError(f'{what} labels span [{labels.min()}, {labels.max()}] but num_classes = '
                     f'{num_classes}; set config.data.num_classes to the dataset\'s class count.')
