r"""Converts a Hugging Face I-JEPA folder (config.json, model.safetensors) into cjepa_jax format.

  cjepa-convert-hf --hf ijepa_vith14_1k --out ckpt/vith14_hf [--scan] [--dtype float32]

(also `python -m cjepa_jax.convert_hf`). `--hf` is the folder as downloaded from the hub (e.g.
facebook/ijepa_vith14_1k), or its model.safetensors with `--hf_config` when config.json lives
elsewhere. The variant, depth, patch and image size come from config.json. No torch, no
transformers and no pickle: the tensors are read with the safetensors numpy API.

The output is an ordinary cjepa_jax checkpoint (`OUT/checkpoints/0/`), the same as
`cjepa-convert-torch` writes, for `cjepa-probe` / `cjepa-finetune` (`--config.pretrained=OUT`) and
`--config.init_from=OUT`. A HF checkpoint holds the ENCODER ONLY (the reference's context encoder,
as HF converted it): `params/encoder` and `target_params` are both that encoder, and there is no
predictor, so `init_from` takes the two encoders and keeps the run's freshly initialised
predictor. Learned (non sin-cos) position embeddings are refused, see `hf.py`. Bad input is one
line (`cjepa-convert-hf: error: ...`, exit 1) and writes nothing.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
import os

from cjepa_jax import cli
from cjepa_jax import hf
from cjepa_jax import reference_layout
from cjepa_jax.models import jepa

_PROG = 'cjepa-convert-hf'


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
  p = argparse.ArgumentParser(
      prog=_PROG,
      description='Converts a Hugging Face I-JEPA folder (transformers IJepaModel: config.json and '
                  'model.safetensors) into a cjepa_jax checkpoint for the probes, fine-tuning and '
                  '--config.init_from.')
  p.add_argument('--hf', required=True,
                 help='The Hugging Face folder, or its model.safetensors file.')
  p.add_argument('--hf_config', default=None,
                 help='Its config.json, when not beside the weights.')
  p.add_argument('--out', required=True, help='Output directory (gets checkpoints/0/).')
  p.add_argument('--scan', action='store_true',
                 help='Store the blocks stacked, for runs with --config.model.scan=True.')
  p.add_argument('--dtype', default=None, choices=sorted(jepa.DTYPES),
                 help='model.dtype (compute dtype) of the saved config; default: the default '
                      "config's (bfloat16). The weights are float32 either way.")
  return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> str:
  """Runs the conversion; returns the written step directory. Raises ValueError on bad input."""
  args = _parse_args(argv)
  if os.path.isdir(os.path.join(args.out, 'checkpoints')) and os.listdir(
      os.path.join(args.out, 'checkpoints')):
    raise ValueError(f'{args.out} already holds checkpoints: pass a new --out directory, or '
                     'delete that one first.')
  state, config = hf.import_hf(args.hf, config_path=args.hf_config, scan=args.scan,
                               dtype=args.dtype)
  source = f'the Hugging Face folder {os.path.abspath(args.hf)}'
  step_dir = reference_layout.save_converted(args.out, state, config, extra={'source': source})
  print(f'Wrote {step_dir} (model.variant={config.model.variant}, model.depth='
        f'{config.model.depth}, image_size={config.data.image_size}, scan={config.model.scan}). '
        'The Hugging Face file holds the encoder only: params/encoder and target_params are both '
        f'it, and --config.init_from={args.out} starts the predictor from scratch. Probe it with '
        f'--config.pretrained={args.out}.')
  return step_dir


def run() -> None:
  """Console entry point: bad input prints the message (no traceback) and exits 1."""
  cli.run_plain(_PROG, main)


if __name__ == '__main__':
  run()
