r"""Hugging Face `transformers` I-JEPA folders <-> cjepa_jax encoders, with numpy and safetensors.

  import_hf(path)                  a HF I-JEPA folder -> (train state, config) to save as a
                                   cjepa_jax checkpoint (`cjepa-convert-hf`).
  export_hf(checkpoint, out)       a cjepa_jax checkpoint's encoder -> a HF `IJepaModel` folder:
                                   config.json, model.safetensors, preprocessor_config.json and
                                   a README.md model card (`cjepa-export`).
  hf_to_reference / reference_to_hf, hf_model_config: the pieces, for tests. The model card
  is written by `hf_card.model_card`.

Neither direction needs torch, transformers or pickle: tensors go through the `safetensors` numpy
API (`pip install 'cjepa_jax[hf]'`; imported only when a file is read or written).

A HF I-JEPA folder (`facebook/ijepa_vith14_1k`, `_vith16_1k`, `_vith14_22k`, `_vitg16_22k`) is a
`config.json` (model_type 'ijepa') and a `model.safetensors` (or shards with
`model.safetensors.index.json`) holding the ENCODER ONLY: HF's conversion script took the
reference checkpoint's context encoder (`encoder`); there is no predictor and no EMA target. The
tensor layout, as `save_pretrained` writes it in transformers 4.x and 5.x alike, against the
reference layout of `reference_layout.py` (then flax, as there):

  embeddings.patch_embeddings.projection.weight/bias   patch_embed.proj.weight/bias  [D, 3, p, p]
  embeddings.position_embeddings [1, N, D]              pos_embed (see below)
  encoder.layer.{i}.layernorm_before / _after.*          blocks.{i}.norm1 / norm2.*
  encoder.layer.{i}.attention.attention.query / key / value.weight [D, D] and .bias [D]
                                                        blocks.{i}.attn.qkv.* [3D, D]: q | k | v
                                                        stacked on the output axis
  encoder.layer.{i}.attention.output.dense.*            blocks.{i}.attn.proj.*
  encoder.layer.{i}.intermediate.dense.*                blocks.{i}.mlp.fc1.*
  encoder.layer.{i}.output.dense.*                      blocks.{i}.mlp.fc2.*
  layernorm.*                                           norm.*
  pooler.dense.* (IJepaModel(add_pooling_layer=True))   dropped: an untrained head, not encoder

Position embeddings: HF stores them as a parameter. The official weights hold the reference's
fixed 2-D sin-cos values (float32 of the float64 formula); cjepa_jax's encoder recomputes that
constant for any grid and has no learned position embedding. So the import checks the stored
tensor against the constant (to 1e-5, or to the storage type's precision for 16-bit files) and
refuses anything else (a freshly initialised or fine-tuned HF model) in one line, instead of
silently replacing it; the export writes the constant for the training resolution.

Architecture checks on config.json: hidden_act 'gelu' (exact erf), layer_norm_eps 1e-6, qkv_bias,
3 channels, square images and patches, and a width / heads / MLP size of one of
`vit.VARIANTS` (depth may differ: `model.depth`). Anything else is a one-line ValueError naming
the key and the fix; so are another model_type (ViT-MAE, DINO, ...), a missing, extra or
misshaped tensor, a truncated file and a config.json that disagrees with the tensors.

Why this module is longer than 450 lines: it is one file format in both directions, and the import
and the export share its tensor layout, its config.json mapping and its checks; the model card,
the one separate concern, is `hf_card.py`.
"""

from __future__ import annotations

from collections.abc import Mapping
import json
import math
import os
import re
import shutil
import tempfile
from typing import Any

from absl import logging
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from cjepa_jax.checkpoint import reading as ckpt_reading
from cjepa_jax import config as config_lib
from cjepa_jax import hf_card
from cjepa_jax import reference_layout
from cjepa_jax.evals import features as features_lib
from cjepa_jax.models import vit

CONFIG_FILE = 'config.json'
WEIGHTS_FILE = 'model.safetensors'
WEIGHTS_INDEX_FILE = 'model.safetensors.index.json'
PREPROCESSOR_FILE = 'preprocessor_config.json'
CARD_FILE = 'README.md'
MODEL_TYPE = 'ijepa'
LN_EPS_RTOL = 1e-3   # layer_norm_eps must be vit.LN_EPS (1e-6) up to float formatting.
POS_EMBED_ATOL = 1e-5  # float32 files: the reference's float32(float64 sin-cos), ours the same.
_POOLER = ('pooler.dense.weight', 'pooler.dense.bias')
_INSTALL = "pip install 'cjepa_jax[hf]'"

# Per block: HF key suffix <-> reference key suffix (query / key / value are the fused qkv).
_BLOCK_RENAMES = (('layernorm_before', 'norm1'), ('layernorm_after', 'norm2'),
                  ('attention.output.dense', 'attn.proj'), ('intermediate.dense', 'mlp.fc1'),
                  ('output.dense', 'mlp.fc2'))
_QKV = ('query', 'key', 'value')
_TOP_RENAMES = (('embeddings.patch_embeddings.projection', 'patch_embed.proj'),
                ('layernorm', 'norm'))
_POS_HF, _POS_REF = 'embeddings.position_embeddings', 'pos_embed'
# ViTImageProcessor's `resample` (PIL codes) for config.data.interpolation.
_PIL_RESAMPLE = {'nearest': 0, 'bilinear': 2, 'bicubic': 3, 'lanczos3': 1, 'lanczos5': 1,
                 'area': 2}


# ------------------------------------------------------------------------------------------------
# Layouts.
# ------------------------------------------------------------------------------------------------


def hf_layout(width: int, mlp: int, patch: int, depth: int, num_patches: int
              ) -> dict[str, tuple[int, ...]]:
  """{HF key: shape} of an IJepaModel (no pooler) of that size, in the file's key order."""
  d = width
  out = {'embeddings.patch_embeddings.projection.weight': (d, 3, patch, patch),
         'embeddings.patch_embeddings.projection.bias': (d,),
         _POS_HF: (1, num_patches, d)}
  for i in range(depth):
    pre = f'encoder.layer.{i}.'
    for name in _QKV:
      out[f'{pre}attention.attention.{name}.weight'] = (d, d)
      out[f'{pre}attention.attention.{name}.bias'] = (d,)
    for name, (w_shape, b_shape) in (('layernorm_before', ((d,), (d,))),
                                     ('layernorm_after', ((d,), (d,))),
                                     ('attention.output.dense', ((d, d), (d,))),
                                     ('intermediate.dense', ((mlp, d), (mlp,))),
                                     ('output.dense', ((d, mlp), (d,)))):
      out[f'{pre}{name}.weight'], out[f'{pre}{name}.bias'] = w_shape, b_shape
  out['layernorm.weight'] = out['layernorm.bias'] = (d,)
  return out


def hf_to_reference(hf: Mapping[str, np.ndarray], depth: int) -> dict[str, np.ndarray]:
  """HF IJepaModel tensors (checked already: `check_hf_tensors`) -> the reference state dict.

  query / key / value [D, D] each become `attn.qkv` [3D, D] (and their biases [3D]), q | k | v
  along the output axis: the reference's reshape(B, N, 3, H, D/H) reads them in that order.
  The position embedding is kept as `pos_embed`.
  """
  ref = {}
  for hf_name, ref_name in _TOP_RENAMES:
    for leaf in ('weight', 'bias'):
      ref[f'{ref_name}.{leaf}'] = hf[f'{hf_name}.{leaf}']
  if _POS_HF in hf:
    ref[_POS_REF] = hf[_POS_HF]
  for i in range(depth):
    hf_pre, ref_pre = f'encoder.layer.{i}.', f'blocks.{i}.'
    for hf_name, ref_name in _BLOCK_RENAMES:
      for leaf in ('weight', 'bias'):
        ref[f'{ref_pre}{ref_name}.{leaf}'] = hf[f'{hf_pre}{hf_name}.{leaf}']
    for leaf in ('weight', 'bias'):
      ref[f'{ref_pre}attn.qkv.{leaf}'] = np.concatenate(
          [hf[f'{hf_pre}attention.attention.{n}.{leaf}'] for n in _QKV], axis=0)
  return ref


def reference_to_hf(ref: Mapping[str, np.ndarray], depth: int) -> dict[str, np.ndarray]:
  """The reference state dict -> HF IJepaModel tensors: `hf_to_reference`'s inverse."""
  hf = {}
  for hf_name, ref_name in _TOP_RENAMES:
    for leaf in ('weight', 'bias'):
      hf[f'{hf_name}.{leaf}'] = ref[f'{ref_name}.{leaf}']
  if _POS_REF in ref:
    hf[_POS_HF] = ref[_POS_REF]
  for i in range(depth):
    hf_pre, ref_pre = f'encoder.layer.{i}.', f'blocks.{i}.'
    for hf_name, ref_name in _BLOCK_RENAMES:
      for leaf in ('weight', 'bias'):
        hf[f'{hf_pre}{hf_name}.{leaf}'] = ref[f'{ref_pre}{ref_name}.{leaf}']
    for leaf in ('weight', 'bias'):
      for name, part in zip(_QKV, np.split(ref[f'{ref_pre}attn.qkv.{leaf}'], 3, axis=0)):
        hf[f'{hf_pre}attention.attention.{name}.{leaf}'] = np.ascontiguousarray(part)
  return hf


# ------------------------------------------------------------------------------------------------
# config.json.
# ------------------------------------------------------------------------------------------------


def _square(value: Any, key: str, where: str) -> int:
  """An int, or a [n, n] list (HF accepts both for image_size / patch_size) -> n."""
  if isinstance(value, (list, tuple)) and len(value) == 2 and value[0] == value[1]:
    value = value[0]
  if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
    raise ValueError(f'{where}: {key}={value!r} is not a positive int or a square [n, n]; '
                     'cjepa_jax encoders take square images and patches.')
  return value


def read_json(path: str, what: str) -> dict[str, Any]:
  """A JSON object from `path`; ValueError naming the file when it is missing or not JSON."""
  if not os.path.isfile(path):
    raise ValueError(f'No {what} at {path}: pass a Hugging Face I-JEPA folder (config.json and '
                     'model.safetensors, as downloaded from the hub).')
  try:
    with open(path, encoding='utf-8') as f:
      data = json.load(f)
  except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
    raise ValueError(f'{path} is not a readable JSON file ({type(e).__name__}: {e}).') from e
  if not isinstance(data, dict):
    raise ValueError(f'{path} holds a JSON {type(data).__name__}, not the object a {what} is.')
  return data


def encoder_from_hf_config(hf_config: Mapping[str, Any], where: str = CONFIG_FILE
                           ) -> dict[str, Any]:
  """The cjepa_jax encoder an IJepaModel config.json describes.

  Returns:
    dict(variant='<size>/<patch>', depth=int (0: the variant's), image_size=int, patch=int,
    num_layers=int, width=int, mlp=int).
  Raises:
    ValueError: another model_type, or an architecture the flax encoder does not have (the key,
      its value and what cjepa_jax needs).
  """
  model_type = hf_config.get('model_type')
  if model_type != MODEL_TYPE:
    raise ValueError(f'{where} describes a {model_type!r} model (model_type), not an I-JEPA one '
                     f'({MODEL_TYPE!r}): cjepa-convert-hf reads transformers IJepaModel folders '
                     '(e.g. facebook/ijepa_vith14_1k); reference .pth.tar files go through '
                     'cjepa-convert-torch.')
  missing = [k for k in ('hidden_size', 'num_hidden_layers', 'num_attention_heads',
                         'intermediate_size', 'image_size', 'patch_size') if k not in hf_config]
  if missing:
    raise ValueError(f'{where} has no {missing}: not a complete IJepaConfig.')
  fixed = (('hidden_act', 'gelu', 'the exact erf GELU'), ('qkv_bias', True, 'biased q/k/v'),
           ('num_channels', 3, 'RGB input'))
  for key, want, why in fixed:
    if hf_config.get(key, want) != want:
      raise ValueError(f'{where}: {key}={hf_config[key]!r}, but the cjepa_jax encoder has '
                       f'{key}={want!r} ({why}) only.')
  eps = float(hf_config.get('layer_norm_eps', 1e-12))  # IJepaConfig's default when absent.
  if not math.isclose(eps, vit.LN_EPS, rel_tol=LN_EPS_RTOL):
    raise ValueError(f'{where}: layer_norm_eps={eps:g}, but the cjepa_jax encoder uses '
                     f'{vit.LN_EPS:g} (as I-JEPA): the features would differ. Only I-JEPA '
                     'models with layer_norm_eps 1e-6 can be converted.')
  width, heads = int(hf_config['hidden_size']), int(hf_config['num_attention_heads'])
  mlp, layers = int(hf_config['intermediate_size']), int(hf_config['num_hidden_layers'])
  patch = _square(hf_config['patch_size'], 'patch_size', where)
  image_size = _square(hf_config['image_size'], 'image_size', where)
  sizes = [s for s, v in vit.VARIANTS.items()
           if (v['width'], v['num_heads'], vit.mlp_dim(v['width'], v['mlp_ratio']))
           == (width, heads, mlp)]
  if not sizes:
    known = ', '.join(f'{s}: {v["width"]}/{v["num_heads"]}/'
                      f'{vit.mlp_dim(v["width"], v["mlp_ratio"])}'
                      for s, v in vit.VARIANTS.items())
    raise ValueError(f'{where}: hidden_size/num_attention_heads/intermediate_size = '
                     f'{width}/{heads}/{mlp} is no ViT size cjepa_jax has ({known}).')
  if layers <= 0:
    raise ValueError(f'{where}: num_hidden_layers={layers} must be positive.')
  if image_size % patch:
    raise ValueError(f'{where}: image_size {image_size} is not a multiple of patch_size {patch}.')
  variant = f'{sizes[0]}/{patch}'
  depth = 0 if layers == vit.VARIANTS[sizes[0]]['depth'] else layers
  return dict(variant=variant, depth=depth, image_size=image_size, patch=patch,
              num_layers=layers, width=width, mlp=mlp)


def hf_model_config(variant: str, depth: int, image_size: int) -> dict[str, Any]:
  """The config.json of an IJepaModel equal to `vit.Encoder(variant, depth)` at `image_size`."""
  spec, patch = vit.parse_variant(variant)
  width = spec['width']
  return {
      'architectures': ['IJepaModel'],
      'model_type': MODEL_TYPE,
      'hidden_size': width,
      'num_hidden_layers': depth or spec['depth'],
      'num_attention_heads': spec['num_heads'],
      'intermediate_size': vit.mlp_dim(width, spec['mlp_ratio']),
      'hidden_act': 'gelu',                       # Exact erf GELU, as nn.gelu(approximate=False).
      'hidden_dropout_prob': 0.0,
      'attention_probs_dropout_prob': 0.0,
      'initializer_range': vit.INIT_STD,
      'layer_norm_eps': vit.LN_EPS,
      'image_size': image_size,
      'patch_size': patch,
      'num_channels': 3,
      'qkv_bias': True,
      'pooler_output_size': width,
      'pooler_act': 'tanh',
      'dtype': 'float32',                         # The stored tensors (the master weights).
  }


# ------------------------------------------------------------------------------------------------
# Tensors.
# ------------------------------------------------------------------------------------------------


def _safetensors_numpy():
  try:
    from safetensors import numpy as st_numpy  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ValueError(f'Reading and writing Hugging Face weights needs safetensors: {_INSTALL}.'
                     ) from e
  return st_numpy


def _weight_files(folder: str) -> list[str]:
  """The safetensors file(s) of a HF folder: model.safetensors, or the shards its index names."""
  single = os.path.join(folder, WEIGHTS_FILE)
  index = os.path.join(folder, WEIGHTS_INDEX_FILE)
  if os.path.isfile(single):
    return [single]
  if os.path.isfile(index):
    weight_map = read_json(index, 'safetensors index').get('weight_map')
    if not isinstance(weight_map, dict) or not weight_map:
      raise ValueError(f'{index} has no weight_map: not a safetensors index.')
    return [os.path.join(folder, f) for f in sorted(set(weight_map.values()))]
  other = sorted(f for f in os.listdir(folder) if f.endswith(('.bin', '.pth', '.pt', '.h5',
                                                                    '.msgpack')))
  hint = (f' It has {other}: pickled or non-PyTorch weights, which this converter does not read '
          '(no pickle); download the safetensors version.') if other else ''
  raise ValueError(f'{folder} has no {WEIGHTS_FILE} (nor {WEIGHTS_INDEX_FILE}).{hint}')


def load_tensors(paths: list[str]) -> tuple[dict[str, np.ndarray], dict[str, np.dtype]]:
  """Every tensor of the safetensors `paths`: ({key: float32 array}, {key: stored dtype}).

  16-bit tensors are widened to float32 (exact); the stored dtypes are kept because they set the
  tolerance of the position-embedding check.
  Raises:
    ValueError: a missing, truncated or damaged file (one line: the file and the fix), a tensor
      named twice across shards, or a non-floating tensor.
  """
  st_numpy = _safetensors_numpy()
  out, dtypes = {}, {}
  for path in paths:
    if not os.path.isfile(path):
      raise ValueError(f'No such weights file: {path}.')
    try:
      tensors = st_numpy.load_file(path)
    except Exception as e:  # pylint: disable=broad-except  (SafetensorError, OSError, ...)
      reason = ' '.join(str(e).split())[:200] or type(e).__name__
      raise ValueError(f'{path} is not a readable safetensors file ({reason}): truncated or '
                       'damaged, e.g. an interrupted download; download it again.') from e
    for key, x in tensors.items():
      if key in out:
        raise ValueError(f'{path}: tensor {key!r} is also in another shard.')
      if not jnp.issubdtype(x.dtype, jnp.floating):   # bfloat16 included.
        raise ValueError(f'{path}: tensor {key!r} has dtype {x.dtype}; expected floating-point '
                         'weights.')
      dtypes[key] = x.dtype
      out[key] = np.asarray(x, np.float32)  # bfloat16 / float16 -> float32 is exact.
  return out, dtypes


def check_hf_tensors(tensors: Mapping[str, np.ndarray], enc: Mapping[str, Any], where: str
                     ) -> None:
  """The tensors are exactly the IJepaModel that config.json (`enc`) describes.

  Raises:
    ValueError: one line naming the first missing, unexpected or misshaped tensor and saying
      whether config.json disagrees with the weights.
  """
  grid = enc['image_size'] // enc['patch']
  layout = hf_layout(enc['width'], enc['mlp'], enc['patch'], enc['num_layers'], grid * grid)
  keys = set(tensors) - set(_POOLER)
  layers = {int(m.group(1)) for k in keys if (m := re.match(r'encoder\.layer\.(\d+)\.', k))}
  found_layers = max(layers) + 1 if layers else 0
  if layers and found_layers != enc['num_layers']:
    raise ValueError(f'{where}: config.json says num_hidden_layers={enc["num_layers"]}, but the '
                     f'tensors have {found_layers} layers (encoder.layer.0 ... '
                     f'encoder.layer.{found_layers - 1}): config.json and the weights disagree.')
  missing = [k for k in layout if k not in keys]
  if missing:
    raise ValueError(f'{where} has no tensor {missing[0]!r}'
                     + (f' (and {len(missing) - 1} more missing)' if len(missing) > 1 else '')
                     + ': not a complete transformers IJepaModel checkpoint.')
  unexpected = sorted(keys - set(layout))
  if unexpected:
    raise ValueError(f'{where} has tensors an IJepaModel does not have: {unexpected[:3]}'
                     + (f' (and {len(unexpected) - 3} more)' if len(unexpected) > 3 else '')
                     + '; not an IJepaModel encoder (a classifier head, or another model).')
  sizes = (f'hidden_size={enc["width"]}, intermediate_size={enc["mlp"]}, patch_size='
           f'{enc["patch"]}, image_size={enc["image_size"]}')
  for key, want in layout.items():
    got = tuple(np.shape(tensors[key]))
    if got != want:
      raise ValueError(f'{where}: tensor {key!r} has shape {got}, but config.json ({sizes}) '
                       f'implies {want}: config.json and the weights disagree.')


def check_sincos(pos: np.ndarray, stored_dtype: Any, where: str) -> None:
  """`pos` [1, N, D] is the fixed 2-D sin-cos embedding, to the stored type's precision.

  Raises:
    ValueError: a learned / random position embedding, which the flax encoder cannot represent.
  """
  n, dim = pos.shape[1], pos.shape[2]
  side = math.isqrt(n)
  if side * side != n:
    raise ValueError(f'{where}: {_POS_HF} has {n} positions, not a square grid.')
  err = float(np.abs(pos[0].astype(np.float64) - vit.sincos_pos_embed_2d(side, side, dim)).max())
  # A 16-bit file stores the constant rounded: allow its precision (bfloat16: 2^-7 relative).
  atol = POS_EMBED_ATOL
  if stored_dtype is not None and np.dtype(stored_dtype).itemsize == 2:
    atol = max(atol, float(jnp.finfo(stored_dtype).eps))
  if not err <= atol:
    raise ValueError(
        f'{where}: {_POS_HF} is not the fixed 2-D sin-cos embedding (max abs difference '
        f'{err:.3g} > {atol:.3g}): a learned or freshly initialised one. cjepa_jax encoders use '
        'the fixed sin-cos positions of I-JEPA and have no learned position embedding, so this '
        'file is refused rather than changed; the official I-JEPA weights hold the sin-cos '
        'values.')


# ------------------------------------------------------------------------------------------------
# Import.
# ------------------------------------------------------------------------------------------------


def resolve_hf_files(path: str, config_path: str | None = None) -> tuple[str, list[str]]:
  """(config.json path, safetensors paths) of a HF folder, or of its weights file.

  `path`: the folder (config.json and model.safetensors, or shards and their index), or one
  .safetensors file (config.json beside it unless `config_path`).
  """
  if os.path.isdir(path):
    return config_path or os.path.join(path, CONFIG_FILE), _weight_files(path)
  if os.path.isfile(path):
    if not path.endswith('.safetensors'):
      raise ValueError(f'{path} is not a .safetensors file: pass the Hugging Face folder or its '
                       'model.safetensors (the .bin / .pth pickles are not read).')
    return config_path or os.path.join(os.path.dirname(path) or '.', CONFIG_FILE), [path]
  raise ValueError(f'No such file or directory: {path}; pass a Hugging Face I-JEPA folder '
                   '(config.json and model.safetensors, e.g. a download of '
                   'facebook/ijepa_vith14_1k).')


def import_hf(path: str, *, config_path: str | None = None, scan: bool = False,
              dtype: str | None = None) -> tuple[dict[str, Any], ml_collections.ConfigDict]:
  """A HF I-JEPA folder -> (train state, config) for `reference_layout.save_converted`.

  Args:
    path: the folder, or its model.safetensors (see `resolve_hf_files`).
    config_path: config.json when not beside the weights.
    scan: store the blocks stacked (`model.scan=True`).
    dtype: model.dtype (compute dtype) of the saved config; None: the default config's.
  Returns:
    state = {'step': 0, 'params': {'encoder'}, 'target_params'} (both the HF encoder; no
    predictor, see `reference_layout.encoder_only_state`) and the config:
    `config.default_config()` with model.variant / depth / scan (/ dtype) and data.image_size
    read from config.json.
  Raises:
    ValueError: any bad input, in one line, before anything is written.
  """
  config_file, weight_files = resolve_hf_files(path, config_path)
  where = weight_files[0] if len(weight_files) == 1 else os.path.dirname(weight_files[0])
  enc = encoder_from_hf_config(read_json(config_file, 'config.json'), config_file)
  tensors, dtypes = load_tensors(weight_files)
  check_hf_tensors(tensors, enc, where)
  check_sincos(tensors[_POS_HF], dtypes[_POS_HF], where)
  ref = hf_to_reference(tensors, enc['num_layers'])
  del ref[_POS_REF]   # Checked above (with the storage type's tolerance); recomputed by flax.
  encoder = reference_layout.convert_encoder(ref, enc['variant'], depth=enc['depth'] or None,
                                             name=where)
  config = config_lib.default_config()
  config.model.variant = enc['variant']
  config.model.depth = enc['depth']
  config.model.scan = scan
  if dtype is not None:
    config.model.dtype = dtype
  config.data.image_size = enc['image_size']
  return reference_layout.encoder_only_state(encoder, config), config


# ------------------------------------------------------------------------------------------------
# Export.
# ------------------------------------------------------------------------------------------------


def preprocessor_config(data: Mapping[str, Any]) -> dict[str, Any]:
  """preprocessor_config.json (a ViTImageProcessor, what the I-JEPA hub folders use) with the
  resolution and normalisation the encoder was trained with (`data.*` of its saved config)."""
  size = int(data['image_size'])
  return {
      'image_processor_type': 'ViTImageProcessor',
      'do_resize': True,
      'size': {'height': size, 'width': size},
      'resample': _PIL_RESAMPLE.get(str(data.get('interpolation', 'bilinear')), 2),
      'do_rescale': True,
      'rescale_factor': 1 / 255,
      'do_normalize': True,
      'image_mean': [float(v) for v in data['mean']],
      'image_std': [float(v) for v in data['std']],
  }


def find_probe_results(step_dir: str, step: int, encoder: str, path: str | None = None
                       ) -> dict[str, Any] | None:
  """The probe_results.json of the exported checkpoint, or None.

  `path` (a file or a probe workdir) is read and must describe this step and encoder (else a
  ValueError); without it, the run's `WORKDIR/probe_results.json` and
  `WORKDIR/probe/probe_results.json` are looked at, and one of another step or encoder is
  skipped with a log line.
  """
  workdir = os.path.dirname(os.path.dirname(step_dir))
  if path is not None:
    candidates = [os.path.join(path, 'probe_results.json') if os.path.isdir(path) else path]
  else:
    candidates = [os.path.join(workdir, 'probe_results.json'),
                  os.path.join(workdir, 'probe', 'probe_results.json')]
  for candidate in candidates:
    if not os.path.isfile(candidate):
      if path is not None:
        raise ValueError(f'No probe results at {candidate}; pass a probe_results.json or the '
                         '--workdir of a cjepa-probe run.')
      continue
    results = read_json(candidate, 'probe_results.json')
    same = results.get('step') == step and (results.get('encoder') or 'target') == encoder
    if same:
      return results
    message = (f'{candidate} is for step {results.get("step")} / encoder '
               f'{results.get("encoder")}, not the exported step {step} / encoder {encoder}')
    if path is not None:
      raise ValueError(message + '; probe this checkpoint, or export the probed one.')
    logging.warning('%s: not put in the model card.', message)
  return None


def export_hf(checkpoint: str, out: str, *, encoder: str = 'target',
              probe_results: str | None = None) -> dict[str, Any]:
  """Writes a checkpoint's encoder as a HF IJepaModel folder `out` (which must not exist yet).

  Args:
    checkpoint: a pretraining workdir (its latest complete step), its checkpoints/ dir, one step
      directory, or a converted checkpoint.
    out: the folder to create: config.json, model.safetensors, preprocessor_config.json,
      README.md. Written to a temporary sibling, then renamed: a failure leaves nothing.
    encoder: 'target' (the EMA target, default) or 'context'; a run without EMA has only the
      context encoder (then 'target' means it, as in the probes).
    probe_results: a probe_results.json (or probe workdir) for the card; None: looked for
      beside the checkpoint (`find_probe_results`).
  Returns:
    info: out, checkpoint (step dir), step, encoder, variant, depth, image_size, probe (bool).
  """
  if encoder not in features_lib.ENCODER_KEYS:
    raise ValueError(f'--encoder {encoder!r}: use one of {sorted(features_lib.ENCODER_KEYS)}.')
  out = os.path.abspath(out)
  if os.path.exists(out) and (not os.path.isdir(out) or os.listdir(out)):
    raise ValueError(f'{out} already exists and is not empty: pass a new --out folder (nothing '
                     'is overwritten).')
  st_numpy = _safetensors_numpy()
  probe_config = ml_collections.ConfigDict(dict(pretrained=checkpoint, encoder=encoder, seed=0))
  module, info = features_lib.resolve_encoder(probe_config)
  sharding = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  params = jax.device_get(features_lib.load_encoder_params(probe_config, module, info, sharding))
  if module.scan:
    params = vit.scan_to_unscanned(params)
  saved = ckpt_reading.load_config(info['checkpoint'])
  extra = ckpt_reading.load_extra(info['checkpoint'])
  variant, depth = info['model']['variant'], int(info['model'].get('depth', 0))
  size = int(info['image_size'])
  spec, patch = vit.parse_variant(variant)
  ref = reference_layout.encoder_to_reference(params, variant, depth=depth or None,
                                              grid=size // patch)
  tensors = reference_to_hf(ref, depth or spec['depth'])
  card_info = dict(info, variant=variant, depth=depth, image_size=size)
  probe = find_probe_results(info['checkpoint'], info['step'], info['encoder'], probe_results)
  files = {
      CONFIG_FILE: hf_model_config(variant, depth, size),
      PREPROCESSOR_FILE: preprocessor_config(dict(saved.get('data', {}), image_size=size)),
  }
  parent = os.path.dirname(out)
  os.makedirs(parent, exist_ok=True)
  tmp = tempfile.mkdtemp(prefix=f'.{os.path.basename(out)}.tmp-', dir=parent)
  try:
    for name, obj in files.items():
      with open(os.path.join(tmp, name), 'w', encoding='utf-8') as f:
        json.dump(obj, f, indent=2)
        f.write('\n')
    with open(os.path.join(tmp, CARD_FILE), 'w', encoding='utf-8') as f:
      f.write(hf_card.model_card(saved, card_info, probe, extra))
    # 'format': 'pt' is what transformers expects of a PyTorch-layout safetensors file.
    st_numpy.save_file({k: tensors[k] for k in sorted(tensors)},
                       os.path.join(tmp, WEIGHTS_FILE), metadata={'format': 'pt'})
    if os.path.isdir(out):
      os.rmdir(out)   # Empty (checked above).
    os.rename(tmp, out)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  return dict(card_info, out=out, probe=probe is not None)
