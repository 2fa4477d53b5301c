r"""The reference I-JEPA parameter layout (facebookresearch/ijepa state dicts) <-> flax params.

Shared by the converters (`convert_torch`: the reference's .pth.tar; `convert_hf`: Hugging Face
I-JEPA folders, whose tensors are renamed to this layout first) and the export (`hf.py`); it works
on numpy arrays and needs neither torch nor pickle. `save_converted` writes the result as a
cjepa_jax checkpoint (`OUT/checkpoints/0/`, by `checkpoint.manager.Checkpointer`): the probes
restore `target_params` from it, fine-tuning takes it as `pretrained`, and pretraining starts
from it with `--config.init_from=OUT` (fresh optimizer, step 0). Its saved config
(`load_config(OUT)`) names the model: model.variant / depth / pred_depth / pred_width / scan and
data.image_size.

Reference layout -> flax layout (see models/vit.py and models/predictor.py):

  patch_embed.proj.weight [D, 3, p, p]   -> patch_embed/kernel [p, p, 3, D]
  *.weight of a Linear    [out, in]      -> */kernel [in, out]
  LayerNorm weight / bias                -> scale / bias
  blocks.{i}.*                           -> blocks_{i}/*           (predictor_blocks.{i} likewise)
  mask_token [1, 1, W]                   -> mask_token [1, 1, W]
  pos_embed, predictor_pos_embed         -> dropped: fixed sin-cos constants that the flax models
                                            recompute; they are checked to BE that constant, so a
                                            model with a learned embedding is refused, not broken.

Strict: every expected key must be present with the expected shape and nothing else may be there
(the fixed position embeddings aside). A mismatch is a ValueError naming the key, the expected and
the found shape, and the --variant / --depth / --pred_depth the checkpoint's shapes point to.
`encoder_to_reference` is the inverse of `convert_encoder` (for the export).

Why this module is longer than 450 lines: one layout, in both directions, with its strict checks;
`encoder_only_state` and `save_converted` (20 lines) stay beside the conversions whose results
they save, rather than make a module of their own.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
import math
import re
from typing import Any

from absl import logging
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from cjepa_jax.checkpoint import manager as ckpt_manager
from cjepa_jax import config as config_lib
from cjepa_jax.models import jepa
from cjepa_jax.models import predictor as predictor_lib
from cjepa_jax.models import vit

REFERENCE_KEYS = ('encoder', 'target_encoder', 'predictor')
_PREFIX = 'module.'
_POS_EMBED_ATOL = 1e-5  # The reference stores float32(float64 sin-cos); ours is the same formula.

# How a torch tensor becomes a flax leaf.
_COPY, _LINEAR, _CONV = 'copy', 'linear', 'conv'


def strip_prefix(state_dict: Mapping[str, Any], name: str = 'state_dict') -> dict[str, Any]:
  """Drops DistributedDataParallel's `module.` key prefix (keys without it are kept as they are)."""
  out = {}
  for key, value in state_dict.items():
    short = key[len(_PREFIX):] if key.startswith(_PREFIX) else key
    if short in out:
      raise ValueError(f'{name} holds both {short!r} and {_PREFIX + short!r}: not a single model.')
    out[short] = value
  return out


def _block_spec(prefix: str, flax_prefix: tuple[str, ...], width: int, hidden: int
                ) -> list[tuple[str, tuple[str, ...], tuple[int, ...], str]]:
  """(torch key, flax path, torch shape, transform) of one pre-norm block."""
  spec = []
  for t_name, f_name, fan_in, fan_out in (('attn.qkv', ('attn', 'qkv'), width, 3 * width),
                                          ('attn.proj', ('attn', 'proj'), width, width),
                                          ('mlp.fc1', ('mlp', 'fc1'), width, hidden),
                                          ('mlp.fc2', ('mlp', 'fc2'), hidden, width)):
    spec.append((f'{prefix}{t_name}.weight', flax_prefix + f_name + ('kernel',),
                 (fan_out, fan_in), _LINEAR))
    spec.append((f'{prefix}{t_name}.bias', flax_prefix + f_name + ('bias',), (fan_out,), _COPY))
  for norm in ('norm1', 'norm2'):
    spec.append((f'{prefix}{norm}.weight', flax_prefix + (norm, 'scale'), (width,), _COPY))
    spec.append((f'{prefix}{norm}.bias', flax_prefix + (norm, 'bias'), (width,), _COPY))
  return spec


def _num_blocks(keys: Sequence[str], prefix: str) -> int:
  """1 + the largest i of the keys `{prefix}{i}.*` (0 when there are none)."""
  pattern = re.compile(re.escape(prefix) + r'(\d+)\.')
  indices = [int(m.group(1)) for k in keys if (m := pattern.match(k))]
  return max(indices) + 1 if indices else 0


def _shape(x: Any) -> tuple[int, ...]:
  return tuple(int(d) for d in np.shape(x))


def infer_encoder_variant(state_dict: Mapping[str, Any]) -> tuple[str | None, int]:
  """('<size>/<patch>' whose width and patch the weights have (None if no size has that width),
  number of blocks). Reads `patch_embed.proj.weight` [D, 3, p, p] and the `blocks.{i}` keys."""
  sd = strip_prefix(state_dict)
  depth = _num_blocks(list(sd), 'blocks.')
  w = sd.get('patch_embed.proj.weight')
  if w is None or len(_shape(w)) != 4:
    return None, depth
  width, patch = _shape(w)[0], _shape(w)[-1]
  sizes = [s for s, v in vit.VARIANTS.items() if v['width'] == width]
  return (f'{sizes[0]}/{patch}' if sizes else None), depth


def _encoder_hint(sd: Mapping[str, Any], variant: str, depth: int) -> str:
  """A sentence naming the --variant (and --depth) the checkpoint's shapes point to ('' when
  that is what was asked for: then the problem is elsewhere and the message says so)."""
  guess, found_depth = infer_encoder_variant(sd)
  if guess is None:
    w = sd.get('patch_embed.proj.weight')
    found = f'width {_shape(w)[0]}' if w is not None else 'no patch_embed.proj.weight'
    return (f' The checkpoint ({found}, {found_depth} blocks) matches no size in '
            f'{sorted(vit.VARIANTS)}: it is not a reference I-JEPA ViT.')
  if guess == variant and found_depth == depth:
    return ''
  hint = f' Its shapes point to --variant {guess}'
  if found_depth != vit.parse_variant(guess)[0]['depth']:
    hint += f' --depth {found_depth}'
  return hint + '.'


def _check_shapes(sd: Mapping[str, Any], spec: Sequence[tuple], name: str, what: str,
                  hint: str) -> None:
  """Every key of `spec` is in `sd` with its expected shape (see `_convert` for the args)."""
  for key, _, expected, _ in spec:
    if key not in sd:
      raise ValueError(f'{name} has no key {key!r} (expected shape {expected} for {what}).{hint}')
    found = _shape(sd[key])
    if found != expected:
      raise ValueError(f'{name}[{key!r}] has shape {found}, but {what} expects {expected}.{hint}')


def _convert(sd: Mapping[str, Any], spec: Sequence[tuple], fixed: Mapping[str, tuple[int, ...]],
             name: str, what: str, hint: str) -> dict:
  """Checks `sd` against `spec` strictly and builds the nested flax params dict.

  Args:
    sd: torch key -> array (prefix already stripped).
    spec: (torch key, flax path, expected torch shape, transform) for every expected key.
    fixed: keys that are dropped (the fixed position embeddings) -> expected shape; optional.
    name: where `sd` came from, for messages (e.g. "checkpoint['encoder']").
    what: the model the spec was built for, for messages (e.g. '--variant H/14').
    hint: appended to the errors (the options the checkpoint's shapes point to).
  Returns:
    {flax path...: float32 array}, nested; Linear weights transposed, the conv kernel to HWIO.
  """
  _check_shapes(sd, spec, name, what, hint)
  for key, expected in fixed.items():
    if key in sd and _shape(sd[key]) != expected:
      raise ValueError(f'{name}[{key!r}] (fixed position embedding) has shape '
                       f'{_shape(sd[key])}, but {what} expects {expected}.{hint}')
  unexpected = sorted(set(sd) - {s[0] for s in spec} - set(fixed))
  if unexpected:
    raise ValueError(f'{name} has unexpected keys {unexpected} that {what} does not have: not the '
                     f'reference I-JEPA layout, or a different model.{hint}')
  params: dict = {}
  for key, path, _, transform in spec:
    x = np.asarray(sd[key])
    if not np.issubdtype(x.dtype, np.floating):
      raise ValueError(f'{name}[{key!r}] has dtype {x.dtype}; expected floating-point weights.')
    x = x.astype(np.float32, copy=False)
    if transform == _LINEAR:   # torch Linear computes x @ W.T.
      x = x.T
    elif transform == _CONV:   # [out, in, kh, kw] -> [kh, kw, in, out].
      x = x.transpose(2, 3, 1, 0)
    node = params
    for p in path[:-1]:
      node = node.setdefault(p, {})
    node[path[-1]] = np.ascontiguousarray(x)
  return params


def _convert_dropping_pos_embed(sd, spec, pos_key: str, width: int, name: str, what: str,
                                hint: str) -> dict:
  """`_convert`, with the fixed position embedding `pos_key` (if present) checked, then dropped."""
  fixed = {}
  if pos_key in sd:
    fixed[pos_key] = (1, _shape(sd[pos_key])[1], width)
  params = _convert(sd, spec, fixed, name, what, hint)
  _check_sincos(sd, pos_key, name)
  return params


def _check_sincos(sd: Mapping[str, Any], key: str, name: str) -> int | None:
  """Checks that `sd[key]` [1, N, C] is the fixed 2-D sin-cos embedding; returns its grid side."""
  if key not in sd:
    return None
  pos = np.asarray(sd[key], np.float64)
  n, dim = pos.shape[1], pos.shape[2]
  side = math.isqrt(n)
  if side * side != n:
    raise ValueError(f'{name}[{key!r}] has {n} positions, not a square grid: not a reference '
                     'I-JEPA checkpoint.')
  err = np.abs(pos[0] - vit.sincos_pos_embed_2d(side, side, dim)).max()
  if err > _POS_EMBED_ATOL:
    raise ValueError(
        f'{name}[{key!r}] differs from the fixed 2-D sin-cos position embedding (max abs '
        f'difference {err:.3g}); the flax models recompute that constant, so a checkpoint with a '
        'learned or different position embedding cannot be converted by dropping it.')
  return side


def convert_encoder(torch_state_dict: Mapping[str, np.ndarray], variant: str, *,
                    depth: int | None = None, name: str = 'encoder') -> dict[str, Any]:
  """Reference ViT state dict (numpy arrays) -> unscanned flax `vit.Encoder` params.

  Args:
    torch_state_dict: key -> array, keys optionally prefixed `module.`; `pos_embed` [1, N, D] is
      optional and checked to be the fixed sin-cos embedding, then dropped.
    variant: '<size>/<patch>' (e.g. 'H/14').
    depth: number of blocks when it differs from the variant's (config.model.depth); None: the
      variant's.
    name: what the dict is, for error messages.
  Returns:
    Nested dict of float32 numpy arrays with the layout of `vit.Encoder(variant, depth=depth)`.
  Raises:
    ValueError: a missing / unexpected key or a wrong shape (message: the key, expected and found
      shapes, and the --variant / --depth the weights point to).
  """
  sd = strip_prefix(torch_state_dict, name)
  spec_v, _ = vit.parse_variant(variant)
  width = spec_v['width']
  want_depth = spec_v['depth'] if depth is None else depth
  what = f'--variant {variant}' + (f' --depth {depth}' if depth is not None else '')
  hint = _encoder_hint(sd, variant, want_depth)

  spec = _encoder_spec(variant, want_depth)
  # The patch embedding is checked first so that a wrong size or patch is reported on the most
  # telling key.
  _check_shapes(sd, spec[:2], name, what, hint)
  found_depth = _num_blocks(list(sd), 'blocks.')
  if found_depth != want_depth:
    raise ValueError(f'{name} has {found_depth} blocks (blocks.0 ... blocks.{found_depth - 1}), '
                     f'but {what} has {want_depth}.{hint}')
  return _convert_dropping_pos_embed(sd, spec, 'pos_embed', width, name, what, hint)


def _encoder_spec(variant: str, depth: int) -> list[tuple[str, tuple[str, ...], tuple[int, ...],
                                                          str]]:
  """(reference key, flax path, reference shape, transform) of every encoder parameter; the
  patch embedding's two entries first."""
  spec_v, patch = vit.parse_variant(variant)
  width, hidden = spec_v['width'], vit.mlp_dim(spec_v['width'], spec_v['mlp_ratio'])
  spec = [('patch_embed.proj.weight', ('patch_embed', 'kernel'), (width, 3, patch, patch), _CONV),
          ('patch_embed.proj.bias', ('patch_embed', 'bias'), (width,), _COPY)]
  for i in range(depth):
    spec += _block_spec(f'blocks.{i}.', (f'blocks_{i}',), width, hidden)
  spec += [('norm.weight', ('norm', 'scale'), (width,), _COPY),
           ('norm.bias', ('norm', 'bias'), (width,), _COPY)]
  return spec


def encoder_to_reference(params: Mapping[str, Any], variant: str, *, depth: int | None = None,
                         grid: int | None = None) -> dict[str, np.ndarray]:
  """Unscanned flax `vit.Encoder` params -> the reference state dict: `convert_encoder`'s inverse.

  Args:
    params: nested dict of arrays, `vit.Encoder(variant, depth=depth)`'s unscanned layout
      (`vit.scan_to_unscanned` first for a `scan=True` checkpoint).
    variant, depth: the encoder (depth None: the variant's).
    grid: also write `pos_embed` [1, grid * grid, D], the fixed sin-cos embedding of a square
      grid of that side; None: no `pos_embed`.
  Returns:
    {reference key: float32 numpy array}: Linear weights [out, in], the conv weight [D, 3, p, p].
  Raises:
    ValueError: `params` lacks a parameter of that encoder or has another shape (a checkpoint of
      another model, or scanned params).
  """
  spec_v, _ = vit.parse_variant(variant)
  spec = _encoder_spec(variant, spec_v['depth'] if depth is None else depth)
  out = {}
  for key, path, shape, transform in spec:
    node = params
    for p in path:
      if not isinstance(node, Mapping) or p not in node:
        raise ValueError(f'The encoder params have no {"/".join(path)} (a {variant} encoder of '
                         f'depth {depth or spec_v["depth"]} has it): another model, or scanned '
                         'params (vit.scan_to_unscanned first).')
      node = node[p]
    x = np.asarray(node, np.float32)
    if transform == _LINEAR:
      x = x.T
    elif transform == _CONV:   # [kh, kw, in, out] -> [out, in, kh, kw].
      x = x.transpose(3, 2, 0, 1)
    if x.shape != shape:
      raise ValueError(f'The encoder param {"/".join(path)} has shape {np.shape(node)}, which '
                       f'is not a {variant} encoder\'s.')
    out[key] = np.ascontiguousarray(x)
  if grid is not None:
    out['pos_embed'] = vit.sincos_pos_embed_2d(grid, grid, spec_v['width'])[None]
  return out


def convert_predictor(torch_state_dict: Mapping[str, np.ndarray], variant: str, *,
                      pred_depth: int | None = None, pred_width: int | None = None,
                      name: str = 'predictor') -> dict[str, Any]:
  """Reference VisionTransformerPredictor state dict (numpy) -> flax `Predictor` params.

  Args:
    torch_state_dict: key -> array, keys optionally prefixed `module.`; `predictor_pos_embed`
      [1, N, W] is optional, checked to be the fixed sin-cos embedding, then dropped.
    variant: the encoder's '<size>/<patch>' (gives the encoder width D and the heads).
    pred_depth: expected number of predictor blocks; None: inferred from the keys.
    pred_width: expected predictor width W; None: inferred from predictor_embed.weight [W, D].
    name: what the dict is, for error messages.
  Returns:
    Nested dict of float32 numpy arrays with the layout of `predictor.Predictor(embed_dim=D,
    width=W, depth=pred_depth)`.
  Raises:
    ValueError: a missing / unexpected key or a wrong shape, named with both shapes.
  """
  sd = strip_prefix(torch_state_dict, name)
  spec_v, _ = vit.parse_variant(variant)
  embed_dim, heads = spec_v['width'], spec_v['num_heads']
  found_depth = _num_blocks(list(sd), 'predictor_blocks.')
  emb = sd.get('predictor_embed.weight')
  found_width = _shape(emb)[0] if emb is not None and len(_shape(emb)) == 2 else None
  width = found_width if pred_width is None else pred_width
  depth = found_depth if pred_depth is None else pred_depth
  if width is None:
    raise ValueError(f'{name} has no 2-D predictor_embed.weight to read the predictor width from: '
                     'not a reference I-JEPA predictor.')
  found_d = _shape(emb)[1] if found_width is not None else None
  hint = ''
  if (found_width, found_depth, found_d) != (width, depth, embed_dim):
    hint = f' Its shapes point to --pred_width {found_width} --pred_depth {found_depth}'
    if found_d is not None and found_d != embed_dim:
      sizes = [s for s, v in vit.VARIANTS.items() if v['width'] == found_d]
      hint += (f' and an encoder of width {found_d}'
               + (f' (--variant {sizes[0]}/<patch>)' if sizes else ''))
    hint += '.'
  what = f'--variant {variant} --pred_width {width} --pred_depth {depth}'
  if depth <= 0:
    raise ValueError(f'{name} has no predictor_blocks.{{i}} keys: not a reference I-JEPA '
                     f'predictor.{hint}')
  if width % heads or width % 4:
    raise ValueError(f'pred_width {width} must be divisible by the encoder\'s {heads} heads and '
                     f'by 4 (sin-cos embedding).{hint}')
  spec = [('predictor_embed.weight', ('predictor_embed', 'kernel'), (width, embed_dim), _LINEAR),
          ('predictor_embed.bias', ('predictor_embed', 'bias'), (width,), _COPY),
          ('mask_token', ('mask_token',), (1, 1, width), _COPY)]
  _check_shapes(sd, spec, name, what, hint)
  if found_depth != depth:
    raise ValueError(f'{name} has {found_depth} blocks (predictor_blocks.0 ... '
                     f'predictor_blocks.{found_depth - 1}), but {what} asks for {depth}.{hint}')
  for i in range(depth):
    spec += _block_spec(f'predictor_blocks.{i}.', (f'blocks_{i}',), width, 4 * width)
  spec += [('predictor_norm.weight', ('predictor_norm', 'scale'), (width,), _COPY),
           ('predictor_norm.bias', ('predictor_norm', 'bias'), (width,), _COPY),
           ('predictor_proj.weight', ('predictor_proj', 'kernel'), (embed_dim, width), _LINEAR),
           ('predictor_proj.bias', ('predictor_proj', 'bias'), (embed_dim,), _COPY)]
  return _convert_dropping_pos_embed(sd, spec, 'predictor_pos_embed', width, name, what, hint)


def _check_against_model(params: Any, abstract: Any, name: str) -> None:
  """Same tree and shapes as the flax model's `init` (abstract: nothing is allocated)."""
  mismatch = jepa.tree_mismatch(params, abstract)
  if mismatch is not None:
    raise AssertionError(f'Converted {name} params do not match the flax model ({mismatch}): a '
                         'converter bug.')


def convert_reference(checkpoint: Mapping[str, Any], variant: str, *, depth: int | None = None,
                      pred_depth: int | None = None, pred_width: int | None = None,
                      image_size: int | None = None, scan: bool = False
                      ) -> tuple[dict[str, Any], ml_collections.ConfigDict]:
  """The reference checkpoint dict (numpy state dicts) -> (train state, config) to save.

  Args:
    checkpoint: {'encoder', 'target_encoder', 'predictor': state dict of numpy arrays, ...};
      other entries (optimizer state, epoch, ...) are ignored.
    variant, depth: the encoder (see `convert_encoder`).
    pred_depth, pred_width: the predictor; None: inferred from its keys and shapes.
    image_size: data.image_size of the saved config; None: read from the encoder's fixed
      `pos_embed` (grid side x patch), else 224.
    scan: store the blocks stacked (config.model.scan = True) instead of blocks_{i}.
  Returns:
    state = {'step': int32 0, 'params': {'encoder', 'predictor'}, 'target_params'} (numpy float32
    leaves) and the config (`config.default_config()` with the model and image size set).
  """
  missing = [k for k in REFERENCE_KEYS if k not in checkpoint]
  if missing:
    raise ValueError(f'The checkpoint has no {missing} entries (it has {sorted(checkpoint)}); a '
                     f'reference I-JEPA checkpoint has {list(REFERENCE_KEYS)}.')
  encoder = convert_encoder(checkpoint['encoder'], variant, depth=depth,
                            name="checkpoint['encoder']")
  target = convert_encoder(checkpoint['target_encoder'], variant, depth=depth,
                           name="checkpoint['target_encoder']")
  predictor = convert_predictor(checkpoint['predictor'], variant, pred_depth=pred_depth,
                                pred_width=pred_width, name="checkpoint['predictor']")
  pred_width = predictor['mask_token'].shape[-1]
  pred_depth = sum(1 for k in predictor if k.startswith('blocks_'))

  _, patch = vit.parse_variant(variant)
  side = _check_sincos(strip_prefix(checkpoint['encoder']), 'pos_embed', 'encoder')
  found_size = None if side is None else side * patch
  if image_size is None:
    image_size = found_size or 224
  elif found_size is not None and found_size != image_size:
    logging.warning('The checkpoint was trained at %dx%d (its pos_embed) but --image_size=%d: the '
                    'flax encoder recomputes the sin-cos embedding for any grid, so this works, '
                    'but it is not the resolution the weights were trained at.',
                    found_size, found_size, image_size)
  vit.patch_grid((image_size, image_size), patch)  # ValueError unless the patch divides it.

  config = config_lib.default_config()
  config.model.variant = variant
  config.model.depth = depth or 0
  config.model.pred_depth = pred_depth
  config.model.pred_width = pred_width
  config.model.scan = scan
  config.data.image_size = image_size

  # The params must be exactly what the flax models' init makes (the trainer and probes check).
  # Checked in the unscanned layout the conversion produces (stacked afterwards when scan).
  enc_model = jepa.encoder_from_model_config(dict(config.model.to_dict(), scan=False))
  s = enc_model.spec
  grid = (image_size // patch,) * 2
  abstract_enc = jepa.abstract_encoder_params(enc_model, image_size)
  pred_model = predictor_lib.Predictor(embed_dim=s['width'], num_heads=s['num_heads'], grid=grid,
                                       width=pred_width, depth=pred_depth)
  abstract_pred = jepa.abstract_predictor_params(pred_model)
  for tree, abstract, what in ((encoder, abstract_enc, 'encoder'), (target, abstract_enc,
                                                                    'target_encoder'),
                               (predictor, abstract_pred, 'predictor')):
    _check_against_model(tree, abstract, what)

  params = {'encoder': encoder, 'predictor': predictor}
  if scan:
    params, target = vit.unscanned_to_scan(params), vit.unscanned_to_scan(target)
  state = {'step': np.asarray(0, np.int32), 'params': params, 'target_params': target}
  return state, config


def encoder_only_state(encoder: Mapping[str, Any], config: ml_collections.ConfigDict
                       ) -> dict[str, Any]:
  """The train state of a checkpoint that holds an encoder and no predictor (a Hugging Face one).

  Args:
    encoder: unscanned flax encoder params (numpy), checked against `config.model`'s encoder at
      `config.data.image_size` (stacked afterwards when `config.model.scan`).
    config: the config that will be saved with it.
  Returns:
    {'step': int32 0, 'params': {'encoder': enc}, 'target_params': enc}. Both encoders are the
    same weights, so the probes and fine-tuning read either (`--config.encoder=target|context`);
    `init_from` takes both and, finding no `params/predictor`, keeps the run's freshly
    initialised predictor (checkpoint.reading.load_init_from).
  """
  model = jepa.encoder_from_model_config(dict(config.model.to_dict(), scan=False))
  _check_against_model(encoder, jepa.abstract_encoder_params(model, int(config.data.image_size)),
                       'encoder')
  if config.model.scan:
    encoder = vit.unscanned_to_scan(encoder)
  target = jax.tree.map(np.copy, encoder)
  return {'step': np.asarray(0, np.int32), 'params': {'encoder': encoder},
          'target_params': target}


def save_converted(out: str, state: Mapping[str, Any], config: ml_collections.ConfigDict, *,
                   extra: dict[str, Any] | None = None) -> str:
  """Writes `state` and `config` as step 0 of a cjepa_jax checkpoint under `out`; returns the
  step directory. Refuses a directory that already holds checkpoints (nothing is overwritten).
  `extra`: a small JSON-able dict saved with the step (where the weights came from), which
  `Checkpointer.restore_extra` reads back (the export's model card does)."""
  with ckpt_manager.Checkpointer(out, keep=1, async_save=False) as ckpt:
    if ckpt.all_steps():
      raise ValueError(f'{out} already holds checkpoints (steps {ckpt.all_steps()}): pass a new '
                       '--out directory, or delete that one first.')
    ckpt.save(0, jax.tree.map(jnp.asarray, state), config, force=True, extra=extra)
    ckpt.wait()
  return str(ckpt.directory / '0')
