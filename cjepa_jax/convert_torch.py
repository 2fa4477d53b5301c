r"""Converts the reference PyTorch I-JEPA checkpoints (facebookresearch/ijepa) to cjepa_jax.

  python -m cjepa_jax.convert_torch --checkpoint IN1K-vit.h.14-300e.pth.tar --variant H/14 \
      --out /tmp/ijepa_vith14 [--pred_depth 12 --pred_width 384 --image_size 224]

The output directory is an ordinary cjepa_jax checkpoint (`OUT/checkpoints/0/`, written by
`checkpoint.manager.Checkpointer`): the probes restore `target_params` from it, and pretraining
starts from it with `--config.init_from=OUT` (fresh optimizer, step 0). Its saved config
(`load_config(OUT)`) names the model: model.variant / depth / pred_depth / pred_width / scan and
data.image_size.

Input: the dict the reference's training script saves, with `encoder`, `target_encoder` and
`predictor` state dicts (keys prefixed `module.` by DistributedDataParallel; the prefix is
stripped when present) and other entries (`opt`, `scaler`, `epoch`, ...) that are ignored.

The layout conversion, its strict checks and the checkpoint writing (`convert_encoder`,
`convert_predictor`, `convert_reference`, `save_converted`) live in `reference_layout.py` (shared
with the Hugging Face converter and export) and work on numpy arrays without torch; torch is
imported only here, to read the .pth.tar file (`load_torch_checkpoint`).
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping, Sequence
import os
import pickle
import re
import zipfile
from typing import Any

from cjepa_jax import cli
from cjepa_jax import reference_layout
from cjepa_jax.models import vit

# Re-exported: this module's API before the layout code moved to reference_layout.py.
REFERENCE_KEYS = reference_layout.REFERENCE_KEYS
convert_encoder = reference_layout.convert_encoder
convert_predictor = reference_layout.convert_predictor
convert_reference = reference_layout.convert_reference
infer_encoder_variant = reference_layout.infer_encoder_variant
save_converted = reference_layout.save_converted
strip_prefix = reference_layout.strip_prefix

_PROG = 'cjepa-convert-torch'  # The console script (also `python -m cjepa_jax.convert_torch`).


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
  step_dir = save_converted(args.out, state, config, extra={
      'source': f'the reference checkpoint {os.path.abspath(args.checkpoint)}'})
  print(f'Wrote {step_dir} (model.variant={config.model.variant}, model.depth='
        f'{config.model.depth}, pred_depth={config.model.pred_depth}, pred_width='
        f'{config.model.pred_width}, image_size={config.data.image_size}). Use it with '
        f'--config.init_from={args.out} or as a probe checkpoint.')
  return step_dir


def run() -> None:
  """Console entry point: bad input prints the message (no traceback) and exits 1."""
  cli.run_plain(_PROG, main)


if __name__ == '__main__':
  run()
