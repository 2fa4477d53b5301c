r"""Exports a cjepa_jax checkpoint's encoder as a Hugging Face `transformers` IJepaModel folder.

  cjepa-export --checkpoint runs/cifar10_ijepa --out hf/cifar10_ijepa [--encoder context] \
      [--probe_results runs/cifar10_ijepa/probe]

(also `python -m cjepa_jax.export`). `--checkpoint` is a pretraining workdir (its latest complete
step), one step directory or a converted checkpoint; `--encoder` picks the EMA target (default)
or the context encoder. Writes OUT/config.json, model.safetensors (float32; safetensors numpy API,
no torch needed), preprocessor_config.json (the run's resolution and normalisation) and a
README.md model card generated from the run's saved config (objective, recipe, data, length) and,
when a probe_results.json of that step and encoder is found (`--probe_results`, or
WORKDIR/probe_results.json, WORKDIR/probe/probe_results.json), its accuracies in percent with
their protocol. Then, in PyTorch:

  from transformers import IJepaModel
  model = IJepaModel.from_pretrained('hf/cifar10_ijepa')
  tokens = model(pixel_values).last_hidden_state   # [B, N, D], as the cjepa_jax encoder's

Scanned (`model.scan=True`) and bfloat16-compute checkpoints export the same way (the weights are
float32 in every checkpoint). Bad input is one line (`cjepa-export: error: ...`, exit 1); OUT
must not exist (or be empty) and is written in a temporary folder first, so a failure leaves none.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from cjepa_jax import cli
from cjepa_jax import hf

_PROG = 'cjepa-export'


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
  p = argparse.ArgumentParser(
      prog=_PROG,
      description='Writes a cjepa_jax checkpoint\'s encoder as a Hugging Face IJepaModel folder '
                  '(config.json, model.safetensors, preprocessor_config.json, README.md).')
  p.add_argument('--checkpoint', required=True,
                 help='A pretraining workdir (latest complete step) or one step directory.')
  p.add_argument('--out', required=True, help='The folder to create.')
  p.add_argument('--encoder', default='target', choices=('target', 'context'),
                 help='The EMA target encoder (default, the one I-JEPA evaluates) or the '
                      'context encoder.')
  p.add_argument('--probe_results', default=None,
                 help='probe_results.json (or its cjepa-probe workdir) for the model card; '
                      'default: looked for beside the checkpoint.')
  return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> str:
  """Runs the export; returns the folder written. Raises ValueError on bad input."""
  args = _parse_args(argv)
  info = hf.export_hf(args.checkpoint, args.out, encoder=args.encoder,
                      probe_results=args.probe_results)
  probe = 'with' if info['probe'] else 'without'
  print(f'Wrote {info["out"]}: the {info["encoder"]} encoder of {info["checkpoint"]} (step '
        f'{info["step"]}, ViT-{info["variant"]}, {info["image_size"]} px) as a transformers '
        f'IJepaModel, model card {probe} probe results. Load it with '
        f'transformers.IJepaModel.from_pretrained({info["out"]!r}).')
  return info['out']


def run() -> None:
  """Console entry point: bad input prints the message (no traceback) and exits 1."""
  cli.run_plain(_PROG, main)


if __name__ == '__main__':
  run()
