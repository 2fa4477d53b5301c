"""Statistics and pictures of the multi-block mask sampler (`cjepa_jax/masks.py`).

  python -m cjepa_jax.mask_stats --image_size 224 --patch_size 14 --json
  python -m cjepa_jax.mask_stats --image_size 32 --patch_size 4 --png /tmp/masks.png

prints, over `--num_batches` batches, the target and context token counts, the overlap between
context and targets and the row / column coverage of the targets: the statistics the reference's
collator was measured with (REFERENCE.md); `--png` draws the first batch's masks.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Sequence

import jax
import numpy as np

from cjepa_jax import masks as masks_lib


def mask_stats(key: jax.Array, batch_size: int, num_batches: int, spec: masks_lib.MaskSpec
               ) -> dict:
  """Statistics of `num_batches` batches, comparable with the reference's (REFERENCE.md)."""
  gh, gw, n = spec.grid_h, spec.grid_w, spec.num_patches
  tgt_tokens, ctx_tokens, ctx_before, overlap = [], [], [], []
  rows_cov = np.zeros(gh)
  cols_cov = np.zeros(gw)
  for key_i in jax.random.split(key, num_batches):
    masks, layout = jax.device_get(masks_lib._sample_jit(  # pylint: disable=protected-access
        key_i, batch_size, spec))
    tgt_tokens.append(masks.tgt_valid.sum(-1).ravel())
    ctx_tokens.append(masks.ctx_valid.sum(-1))
    ctx_before.append(layout.ctx_mask.reshape(batch_size, n).sum(-1))
    # Union of the targets from the valid slots only (padded slots are sent to a spare column n).
    in_tgt = np.zeros((batch_size, n + 1), bool)
    flat = np.where(masks.tgt_valid, masks.tgt_idx, n).reshape(batch_size, -1)
    np.put_along_axis(in_tgt, flat, True, axis=1)
    in_tgt = in_tgt[:, :n]
    overlap.append((np.take_along_axis(in_tgt, masks.ctx_idx, axis=1) & masks.ctx_valid).sum(-1))
    grid = in_tgt.reshape(batch_size, gh, gw)
    rows_cov += grid.any(axis=2).sum(0)
    cols_cov += grid.any(axis=1).sum(0)
  tgt_tokens, ctx_tokens = np.concatenate(tgt_tokens), np.concatenate(ctx_tokens)
  total = batch_size * num_batches
  return dict(
      grid=[gh, gw], batch_size=batch_size, num_batches=num_batches,
      reference_quirks=spec.reference_quirks, min_keep=spec.min_keep,
      Kc=spec.num_context, Kt=spec.max_target,
      target_tokens_mean=float(tgt_tokens.mean()), target_tokens_min=int(tgt_tokens.min()),
      target_tokens_max=int(tgt_tokens.max()),
      context_tokens_mean=float(ctx_tokens.mean()), context_tokens_min=int(ctx_tokens.min()),
      context_tokens_max=int(ctx_tokens.max()),
      context_tokens_before_budget_mean=float(np.concatenate(ctx_before).mean()),
      overlap_tokens=float(np.concatenate(overlap).mean()),
      row_coverage=(rows_cov / total).round(4).tolist(),
      col_coverage=(cols_cov / total).round(4).tolist())


def draw_masks(masks: masks_lib.Masks, spec: masks_lib.MaskSpec, path: str,
               num_images: int = 8) -> None:
  """Draws the first images' context (blue) and target blocks (one colour each) to a PNG."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  masks = jax.device_get(masks)
  gh, gw = spec.grid_h, spec.grid_w
  num = min(num_images, masks.ctx_idx.shape[0])
  fig, axes = plt.subplots(1, num, figsize=(2.2 * num, 2.4), squeeze=False)
  colours = plt.get_cmap('tab10').colors
  for i, ax in enumerate(axes[0]):
    rgba = np.ones((gh * gw, 4))
    rgba[masks.ctx_idx[i][masks.ctx_valid[i]]] = (0.55, 0.7, 0.95, 1.0)
    ax.imshow(rgba.reshape(gh, gw, 4), interpolation='nearest')
    for blk in range(spec.npred):
      cells = masks.tgt_idx[i, blk][masks.tgt_valid[i, blk]]
      r, c = np.divmod(cells, gw)
      ax.add_patch(matplotlib.patches.Rectangle(
          (c.min() - 0.5, r.min() - 0.5), c.max() - c.min() + 1, r.max() - r.min() + 1,
          facecolor=colours[(blk + 1) % 10], edgecolor=colours[(blk + 1) % 10], alpha=0.45,
          linewidth=1.5))
    ax.set_title(f'ctx {int(masks.ctx_valid[i].sum())}', fontsize=8)
    ax.set_xticks([])
    ax.set_yticks([])
  fig.suptitle(f'{gh}x{gw} grid: context (blue), {spec.npred} targets', fontsize=9)
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)


def main(argv: Sequence[str] | None = None) -> None:
  """The command line: parses `argv`, prints the statistics (and draws `--png`)."""
  parser = argparse.ArgumentParser(prog='python -m cjepa_jax.mask_stats',
                                   description=__doc__.split('\n')[0])
  parser.add_argument('--image_size', type=int, default=224)
  parser.add_argument('--patch_size', type=int, default=14)
  parser.add_argument('--batch_size', type=int, default=128)
  parser.add_argument('--num_batches', type=int, default=20)
  parser.add_argument('--seed', type=int, default=0)
  parser.add_argument('--npred', type=int, default=4)
  parser.add_argument('--min_keep', type=int, default=10)
  parser.add_argument('--context_tokens', type=int, default=0)
  parser.add_argument('--reference_quirks', action='store_true')
  parser.add_argument('--allow_overlap', action='store_true')
  parser.add_argument('--json', action='store_true', help='Print a JSON object as the last line.')
  parser.add_argument('--png', default='', help='Draw the first batch\'s masks to this file.')
  args = parser.parse_args(argv)
  if args.image_size % args.patch_size:
    parser.error(f'--image_size {args.image_size} is not divisible by --patch_size '
                 f'{args.patch_size}.')
  grid = args.image_size // args.patch_size
  spec = masks_lib.MaskSpec(grid, grid, npred=args.npred, min_keep=args.min_keep,
                  allow_overlap=args.allow_overlap, reference_quirks=args.reference_quirks,
                  context_tokens=args.context_tokens)
  key = jax.random.key(args.seed)
  stats = mask_stats(key, args.batch_size, args.num_batches, spec)
  print(f'grid {grid}x{grid} ({args.image_size}/{args.patch_size}), batch {args.batch_size} x '
        f'{args.num_batches}, reference_quirks={spec.reference_quirks}, '
        f'min_keep={spec.min_keep}: Kc={stats["Kc"]}, Kt={stats["Kt"]}')
  print(f'target tokens per block: mean {stats["target_tokens_mean"]:.1f} '
        f'(min {stats["target_tokens_min"]}, max {stats["target_tokens_max"]})')
  print(f'context tokens per image: {stats["context_tokens_mean"]:.1f} after the budget '
        f'(min {stats["context_tokens_min"]}, max {stats["context_tokens_max"]}), '
        f'{stats["context_tokens_before_budget_mean"]:.1f} before')
  print(f'context tokens also in a target, per image: {stats["overlap_tokens"]:.2f}')
  print('target row coverage: ' + ' '.join(f'{c:.2f}' for c in stats['row_coverage']))
  print('target col coverage: ' + ' '.join(f'{c:.2f}' for c in stats['col_coverage']))
  if args.png:
    draw_masks(masks_lib._sample_jit(key, args.batch_size, spec)[0], spec, args.png)
    print(f'wrote {args.png}')
  if args.json:
    print(json.dumps(stats))
  sys.stdout.flush()


if __name__ == '__main__':
  main()
