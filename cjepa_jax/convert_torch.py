r"""Converts the reference PyTorch I-JEPA checkpoints (facebookresearch/ijepa) to cjepa_jax.

  python -m cjepa_jax.convert_torch --checkpoint IN1K-vit.h.14-300e.pth.tar --variant H/14 \
      --out /tmp/ijepa_vith14 [--pred_depth 12 --pred_width 384 --image_size 224]

The output directory is an ordinary cjepa_jax checkpoint (`OUT/checkpoints/0/`, written by
`checkpoint.Checkpointer`): the probes restore `target_params` from it, and pretraining starts from
it with `--config.init_from=OUT` (fresh optimizer, step 0). Its saved config (`load_config(OUT)`)
names the model: model.variant / depth / pred_depth / pred_width / scan and data.image_size.

Input: the dict the reference's training script saves, with `encoder`, `target_encoder` and
`predictor` state dicts (keys prefixed `module.` by DistributedDataParallel; the prefix is
stripped when present) and other entries (`opt`, `scaler`, `epoch`, ...) that are ignored.

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

The conversion itself (`convert_encoder`, `convert_predictor`, `convert_reference`) works on numpy
arrays and needs no torch; torch is imported only to read the .pth.tar file
(`load_torch_checkpoint`).
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping, Sequence
import math
import os
import pickle
import re
import zipfile
from typing import Any

from absl import logging
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from cjepa_jax import checkpoint as checkpoint_lib
from cjepa_jax import cli
from cjepa_jax import config as config_lib
from cjepa_jax.models import jepa
from cjepa_jax.models import predictor as predictor_lib
from cjepa_jax.models import vit

REFERENCE_KEYS = ('encoder', 'target_encoder', 'predictor')
_PREFIX = 'module.'
_PROG = 'cjepa-convert-torch'  # The console script (also `python -m cjepa_jax.convert_torch`).
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
  spec_v, patch = vit.parse_variant(variant)
  width, hidden = spec_v['width'], vit.mlp_dim(spec_v['width'], spec_v['mlp_ratio'])
  want_depth = spec_v['depth'] if depth is None else depth
  what = f'--variant {variant}' + (f' --depth {depth}' if depth is not None else '')
  hint = _encoder_hint(sd, variant, want_depth)

  spec = [('patch_embed.proj.weight', ('patch_embed', 'kernel'), (width, 3, patch, patch), _CONV),
          ('patch_embed.proj.bias', ('patch_embed', 'bias'), (width,), _COPY)]
  # Checked first so that a wrong size or patch is reported on the most telling key.
  _check_shapes(sd, spec, name, what, hint)
  found_depth = _num_blocks(list(sd), 'blocks.')
  if found_depth != want_depth:
    raise ValueError(f'{name} has {found_depth} blocks (blocks.0 ... blocks.{found_depth - 1}), '
                     f'but {what} has {want_depth}.{hint}')
  for i in range(want_depth):
    spec += _block_spec(f'blocks.{i}.', (f'blocks_{i}',), width, hidden)
  spec += [('norm.weight', ('norm', 'scale'), (width,), _COPY),
           ('norm.bias', ('norm', 'bias'), (width,), _COPY)]
  return _convert_dropping_pos_embed(sd, spec, 'pos_embed', width, name, what, hint)


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


def load_torch_checkpoint(path: str, *, trust_pickle: bool = False) -> dict[str, Any]:
  """Reads a reference .pth.tar with torch (CPU) -> {'encoder', 'target_encoder', 'predictor':
  {key: float32 numpy array}} (other entries dropped).

  Loads with `weights_only=True` (torch's safe unpickler: tensors, dicts, lists, numbers) unless
  `trust_pickle`; the reference checkpoints hold only such objects. Memory-maps the file so a
  ViT-H checkpoint (several GB with its optimizer state) is not read whole.

  Raises:
    ValueError: one line naming the problem and the fix: a missing file, a file that is not a
      PyTorch checkpoint, objects the safe unpickler refuses (then, and only without
      `trust_pickle`, the advice to pass --trust_pickle), or not the reference layout.
  """
  try:
    import torch  # pylint: disable=g-import-not-at-top  (only this path needs torch)
  except ImportError as e:
    raise ValueError('Reading a .pth.tar needs torch: pip install "cjepa_jax[torch]" (the CPU '
                     'wheel is enough).') from e
  if not os.path.exists(path):
    raise ValueError(f'No such checkpoint file: {path}; pass the .pth.tar file the reference code '
                     'saved.')
  if os.path.isdir(path):
    raise ValueError(f'{path} is a directory; pass the .pth.tar file the reference code saved.')
  kwargs = dict(map_location='cpu', weights_only=not trust_pickle)
  try:
    try:
      raw = torch.load(path, mmap=True, **kwargs)
    except RuntimeError as e:  # Legacy (pre-zipfile) serialization cannot be memory-mapped.
      if 'mmap' not in str(e):
        raise
      raw = torch.load(path, **kwargs)
  except MemoryError:
    raise
  # On a file that is not a checkpoint, torch.load raises whatever its unpickler trips on
  # (KeyError, EOFError, RuntimeError, UnpicklingError, ...): each becomes one line.
  except Exception as e:  # pylint: disable=broad-except
    raise _load_error(path, e, trust_pickle) from e
  if not isinstance(raw, Mapping):
    raise ValueError(f'{path} holds a {type(raw).__name__}, not the reference dict with '
                     f'{list(REFERENCE_KEYS)}.')

  def to_numpy(key, t):
    if not isinstance(t, torch.Tensor):
      raise ValueError(f'{path}: entry {key!r} is a {type(t).__name__}, not a tensor.')
    t = t.detach()
    # numpy has no bfloat16; every weight is float32 in the flax models anyway.
    return (t.float() if t.is_floating_point() else t).numpy()

  out = {}
  for name in REFERENCE_KEYS:
    if name in raw:
      if not isinstance(raw[name], Mapping):
        raise ValueError(f'{path}: {name!r} is a {type(raw[name]).__name__}, not a state dict.')
      out[name] = {k: to_numpy(f'{name}.{k}', v) for k, v in raw[name].items()}
  missing = [k for k in REFERENCE_KEYS if k not in out]
  if missing:
    raise ValueError(f'{path} has no {missing} entries (it has {sorted(raw)}); a reference '
                     f'I-JEPA checkpoint has {list(REFERENCE_KEYS)}.')
  return out


def _torch_file_format(path: str) -> str | None:
  """'zip' (what torch.save writes since 1.6), 'pickle' (its legacy format) or None (neither)."""
  if zipfile.is_zipfile(path):
    return 'zip'
  with open(path, 'rb') as f:
    head = f.read(2)
  # A pickle of protocol 2 or later opens with the PROTO opcode (0x80) and the protocol number.
  return 'pickle' if len(head) == 2 and head[0] == 0x80 and 2 <= head[1] <= 5 else None


def _short_reason(e: BaseException, limit: int = 160) -> str:
  """The gist of a torch.load exception on one line: its type and first sentence."""
  msg = re.sub(r'\x1b\[[0-9;]*m', '', str(e))  # No ANSI codes (torch bolds its warnings).
  # torch's weights-only refusals put paragraphs of general advice before the actual cause.
  if 'WeightsUnpickler error:' in msg:
    msg = msg.split('WeightsUnpickler error:', 1)[1]
  msg = re.split(r'\n\s*\n', msg.strip())[0]   # The first paragraph,
  msg = ' '.join(msg.split()).split('. ', 1)[0].rstrip('.')  # on one line, its first sentence.
  if len(msg) > limit:
    msg = msg[:limit - 3] + '...'
  return f'{type(e).__name__}: {msg}' if msg else type(e).__name__


def _load_error(path: str, e: Exception, trust_pickle: bool) -> ValueError:
  """The one-line ValueError for a torch.load failure on the existing file `path`."""
  reason = 'the file is empty' if os.path.getsize(path) == 0 else _short_reason(e)
  if isinstance(e, OSError):
    return ValueError(f'Cannot read {path} ({reason}); check the path and its permissions.')
  # The safe unpickler refusing a real torch file is the one failure --trust_pickle can fix. A
  # file of another kind makes it fail too (its bytes are not allowed opcodes), but there the
  # advice would only lead to a second, different failure.
  torch_format = _torch_file_format(path) is not None
  if not trust_pickle and isinstance(e, pickle.UnpicklingError) and torch_format:
    return ValueError(
        f'{path} holds objects that torch.load(weights_only=True) refuses to unpickle ({reason}); '
        'if the file comes from a source you trust, rerun with --trust_pickle (a full unpickle '
        'can run arbitrary code, so never use it on files from elsewhere).')
  what = 'could not be loaded as' if torch_format else 'is not'
  return ValueError(f'{path} {what} a PyTorch checkpoint (torch.load failed: {reason}); pass the '
                    '.pth.tar file the reference code saved.')


def save_converted(out: str, state: Mapping[str, Any],
                   config: ml_collections.ConfigDict) -> str:
  """Writes `state` and `config` as step 0 of a cjepa_jax checkpoint under `out`; returns the
  step directory. Refuses a directory that already holds checkpoints (nothing is overwritten)."""
  with checkpoint_lib.Checkpointer(out, keep=1, async_save=False) as ckpt:
    if ckpt.all_steps():
      raise ValueError(f'{out} already holds checkpoints (steps {ckpt.all_steps()}): pass a new '
                       '--out directory, or delete that one first.')
    ckpt.save(0, jax.tree.map(jnp.asarray, state), config, force=True)
    ckpt.wait()
  return str(ckpt.directory / '0')


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
  p = argparse.ArgumentParser(
      prog=_PROG,
      description='Converts a reference I-JEPA .pth.tar (facebookresearch/ijepa) into a cjepa_jax '
                  'checkpoint for the probes and for --config.init_from.')
  p.add_argument('--checkpoint', required=True, help='The reference .pth.tar file.')
  p.add_argument('--variant', required=True, help="Encoder '<size>/<patch>', e.g. H/14.")
  p.add_argument('--out', required=True, help='Output directory (gets checkpoints/0/).')
  p.add_argument('--depth', type=int, default=0,
                 help="Encoder blocks when not the variant's (config.model.depth); 0: variant's.")
  p.add_argument('--pred_depth', type=int, default=None,
                 help='Predictor blocks (12 for the ViT-H recipes); default: read from the keys.')
  p.add_argument('--pred_width', type=int, default=None,
                 help='Predictor width (384 in every recipe); default: read from the shapes.')
  p.add_argument('--image_size', type=int, default=None,
                 help="data.image_size of the saved config; default: the checkpoint's pos_embed.")
  p.add_argument('--scan', action='store_true',
                 help='Store the blocks stacked, for runs with --config.model.scan=True.')
  p.add_argument('--trust_pickle', action='store_true',
                 help='torch.load with weights_only=False: a full unpickle, which can run '
                      'arbitrary code; only for files from a source you trust.')
  return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> str:
  """Runs the conversion; returns the written step directory. Raises ValueError on bad input."""
  args = _parse_args(argv)
  vit.parse_variant(args.variant)  # Fail on a malformed variant before reading gigabytes.
  checkpoint = load_torch_checkpoint(args.checkpoint, trust_pickle=args.trust_pickle)
  state, config = convert_reference(
      checkpoint, args.variant, depth=args.depth or None, pred_depth=args.pred_depth,
      pred_width=args.pred_width, image_size=args.image_size, scan=args.scan)
  del checkpoint
  step_dir = save_converted(args.out, state, config)
  print(f'Wrote {step_dir} (model.variant={config.model.variant}, model.depth='
        f'{config.model.depth}, pred_depth={config.model.pred_depth}, pred_width='
        f'{config.model.pred_width}, image_size={config.data.image_size}). Use it with '
        f'--config.init_from={args.out} or as a probe checkpoint.')
  return step_dir


def run() -> None:
  """Console entry point: bad input prints the message (no traceback) and exits 1."""
  try:
    main()
  except cli.USER_ERRORS as e:
    cli.fail(_PROG, e)


if __name__ == '__main__':
  run()
