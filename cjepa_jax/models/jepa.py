"""The JEPA model bundle: every module of a run built from a config, and the one fit check.

Training, probing, fine-tuning, the reference-checkpoint converter and the benchmarks all build
their models here, from a `ModelSpec` (the config's `model.*`, `mask.*` and VICReg projector,
read and checked once) or from the `model.*` dict saved with a checkpoint, so one variant string
means one parameter tree everywhere:

  ModelSpec.from_config(config)  what the models of a pretraining run are; raises naming the key.
  build_models(spec)             Models(encoder, predictor, projector, mask_spec, image_size).
  encoder_from_model_config(m)   an Encoder from `config.model` or a checkpoint's saved `model`.
  abstract_*_params(...)         ShapeDtypeStructs of a module's params (nothing allocated).
  tree_mismatch(tree, abstract)  the first difference between a parameter tree and a model's, or
                                 None: the check behind every "checkpoint of another model" error.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from cjepa_jax import flops as flops_lib
from cjepa_jax import masks as masks_lib
from cjepa_jax.models import predictor as predictor_lib
from cjepa_jax.models import projector as projector_lib
from cjepa_jax.models import vit

Params = Any

DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16, 'float16': jnp.float16}


@dataclasses.dataclass(frozen=True)
class Models:
  """The modules of a run and the mask spec they are trained with."""
  encoder: nn.Module
  predictor: nn.Module
  projector: nn.Module | None
  mask_spec: masks_lib.MaskSpec
  image_size: int

  def step_shape(self) -> flops_lib.StepShape:
    """Sizes for the analytic FLOP count."""
    enc = self.encoder.spec
    spec = self.mask_spec
    proj = ()
    if self.projector is not None:
      proj = tuple(int(w) for w in self.projector.spec.split('-'))
    return flops_lib.StepShape(
        width=enc['width'], depth=enc['depth'], mlp_hidden=enc['mlp_dim'],
        num_patches=spec.grid_h * spec.grid_w, patch_size=enc['patch'],
        context_tokens=spec.num_context, target_tokens=spec.max_target,
        num_targets=spec.npred, pred_width=self.predictor.width,
        pred_depth=self.predictor.depth, projector=proj)


def compute_dtype(name: str) -> Any:
  """The jnp dtype of `config.model.dtype`."""
  if name not in DTYPES:
    raise ValueError(f'config.model.dtype={name!r} is not one of {sorted(DTYPES)}.')
  return DTYPES[name]


def check_attention(name: str, dtype: Any) -> str:
  """Validates `config.model.attention` against the backend and dtype before anything compiles.

  cuDNN's flash attention exists only on NVIDIA GPUs and only in 16-bit types; without this check
  either mistake surfaces as a lowering error deep inside XLA.
  """
  if name not in vit.ATTENTION_IMPLS:
    raise ValueError(f'config.model.attention={name!r} is not one of {vit.ATTENTION_IMPLS}.')
  if name == 'cudnn':
    backend = jax.default_backend()
    if backend != 'gpu':
      raise ValueError(f"config.model.attention='cudnn' (cuDNN flash attention) needs an NVIDIA "
                       f"GPU, but this run's backend is {backend!r}: use 'xla'.")
    if dtype not in (jnp.bfloat16, jnp.float16):
      raise ValueError("config.model.attention='cudnn' runs in bfloat16 or float16 only: set "
                       "--config.model.dtype=bfloat16, or use --config.model.attention=xla.")
  return name


def encoder_from_model_config(model: Mapping[str, Any]) -> vit.Encoder:
  """An inference Encoder from a `model.*` config (a ConfigDict or a checkpoint's saved dict).

  Keeps the variant, depth override, compute dtype and `scan` (it fixes the parameter layout);
  remat is irrelevant without gradients.
  """
  return vit.Encoder(variant=model['variant'], depth=int(model.get('depth', 0)) or None,
                     dtype=compute_dtype(model.get('dtype', 'float32')),
                     scan=bool(model.get('scan', False)))


@dataclasses.dataclass(frozen=True)
class ModelSpec:
  """The modules of a pretraining run: `config.model.*`, the masks, the 'blocks' projector."""
  variant: str
  depth: int                    # > 0 overrides the variant's depth.
  dtype: str                    # A key of DTYPES.
  remat_policy: str
  scan: bool
  attention: str
  pred_depth: int
  pred_width: int
  image_size: int
  mask: masks_lib.MaskSpec
  projector: str | None         # VICReg 'blocks' mode's projector widths; None: no projector.
  projector_norm: str

  @classmethod
  def from_config(cls, config: ml_collections.ConfigDict) -> ModelSpec:
    """Reads and checks `model.*`, `mask.*`, `data.image_size` and `vicreg.*` (the projector).

    Raises:
      ValueError: one line naming the key (a bad variant first: it explains the rest).
    """
    m, v = config.model, config.vicreg
    vit.parse_variant(m.variant)
    check_attention(m.attention, compute_dtype(m.dtype))
    if v.mode not in ('context', 'blocks'):
      raise ValueError(f"config.vicreg.mode={v.mode!r}: use 'context' or 'blocks'.")
    blocks = v.weight > 0 and v.mode == 'blocks'
    return cls(m.variant, m.depth, m.dtype, m.remat_policy, m.scan, m.attention, m.pred_depth,
               m.pred_width, int(config.data.image_size), masks_lib.MaskSpec.from_config(config),
               v.projector if blocks else None, v.projector_norm)


def build_models(spec: ModelSpec) -> Models:
  """Builds encoder, predictor, optional projector and mask spec of `spec`."""
  dtype = compute_dtype(spec.dtype)
  common = dict(dtype=dtype, remat_policy=spec.remat_policy, scan=spec.scan,
                attention_impl=spec.attention)
  encoder = vit.Encoder(variant=spec.variant, depth=spec.depth or None, **common)
  enc = encoder.spec  # Raises a ValueError naming the valid sizes for an unknown variant.
  predictor = predictor_lib.Predictor(
      embed_dim=enc['width'], num_heads=enc['num_heads'],
      grid=(spec.mask.grid_h, spec.mask.grid_w), width=spec.pred_width, depth=spec.pred_depth,
      **common)
  projector = None
  if spec.projector is not None:
    projector = projector_lib.Projector(spec=spec.projector, norm=spec.projector_norm)
  return Models(encoder, predictor, projector, spec.mask, spec.image_size)


def abstract_encoder_params(encoder: vit.Encoder, image_size: int) -> Params:
  """The encoder's parameter tree as ShapeDtypeStructs, for `image_size` px images."""
  images = jax.ShapeDtypeStruct((1, image_size, image_size, 3), jnp.float32)
  return jax.eval_shape(lambda x: encoder.init(jax.random.key(0), x)['params'], images)


def abstract_predictor_params(predictor: predictor_lib.Predictor) -> Params:
  """The predictor's parameter tree as ShapeDtypeStructs (its sizes do not depend on the input)."""
  s = jax.ShapeDtypeStruct
  args = (s((1, 1, predictor.embed_dim), jnp.float32), s((1, 1), jnp.int32),
          s((1, 1), jnp.bool_), s((1, 1, 1), jnp.int32), s((1, 1, 1), jnp.bool_))
  return jax.eval_shape(lambda *a: predictor.init(jax.random.key(0), *a)['params'], *args)


class Mismatch(NamedTuple):
  """The first difference between a parameter tree and a model's (`tree_mismatch`).

  path is None when the tree structures differ; else the leaf's path (`['blocks_0']['kernel']`)
  with its shape in the tree (`got`) and in the model (`want`). `str()` describes it.
  """
  path: str | None
  got: tuple[int, ...] | None = None
  want: tuple[int, ...] | None = None

  def __str__(self) -> str:
    if self.path is None:
      return 'its parameter tree has another structure'
    return f'{self.path} has shape {self.got} but the model wants {self.want}'


def tree_mismatch(tree: Params, abstract: Params) -> Mismatch | None:
  """How `tree` (arrays or anything with a shape) differs from a model's `abstract` params.

  Returns None when both have the same structure and every leaf the same shape; otherwise the
  first difference, for the caller's error message.
  """
  if jax.tree.structure(tree) != jax.tree.structure(abstract):
    return Mismatch(None)
  for (path, got), want in zip(jax.tree_util.tree_leaves_with_path(tree),
                               jax.tree.leaves(abstract)):
    if tuple(np.shape(got)) != tuple(want.shape):
      return Mismatch(jax.tree_util.keystr(path), tuple(np.shape(got)), tuple(want.shape))
  return None
