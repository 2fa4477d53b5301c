"""Analytic FLOP count of one I-JEPA / C-JEPA train step, and device peak FLOP/s for MFU.

Counts matmul FLOPs only (2 per multiply-add), the convention of PaLM's MFU: norms, softmax, GELU
and the optimizer are a few percent and are left out, so MFU is slightly understated. Per
transformer block on K tokens of width D with MLP hidden F:
  qkv 6KD^2 + attention scores and values 4K^2 D + output projection 2KD^2 + MLP 4KDF.
A backward pass costs twice its forward pass. The step runs
  target encoder forward on all N patches (no gradient),
  context encoder forward + backward on Kc context tokens (the patch embedding on all N),
  predictor: its input projection once on the Kc context tokens, then M passes of Kc + Kt
  tokens, forward + backward.
Padded mask slots are computed like real ones (static shapes), so they count.
"""

from __future__ import annotations

import dataclasses

import jax

# Dense bf16 peak TFLOP/s per device (no sparsity), from the vendors' data sheets.
PEAK_TFLOPS = {
    'NVIDIA H200': 989.0,
    'NVIDIA H100 80GB HBM3': 989.0,
    'NVIDIA H100': 989.0,
    'NVIDIA A100-SXM4-80GB': 312.0,
    'NVIDIA A100-SXM4-40GB': 312.0,
    'NVIDIA A100': 312.0,
    'TPU v4': 275.0,
    'TPU v5 lite': 197.0,
    'TPU v5e': 197.0,
    'TPU v5p': 459.0,
    'TPU v6 lite': 918.0,
    'TPU v6e': 918.0,
}


@dataclasses.dataclass(frozen=True)
class StepShape:
  """What the FLOP count depends on. Widths in channels, counts in tokens."""
  width: int          # Encoder width D.
  depth: int
  mlp_hidden: int
  num_patches: int    # N.
  patch_size: int
  context_tokens: int  # Kc (fixed budget, padding included).
  target_tokens: int   # Kt per block (padding included).
  num_targets: int     # M.
  pred_width: int
  pred_depth: int
  projector: tuple[int, ...] = ()  # 'blocks'-mode projector widths, () when unused.


def block_flops(tokens: int, width: int, mlp_hidden: int) -> float:
  """Forward FLOPs of one transformer block on `tokens` tokens."""
  k, d = tokens, width
  return 8 * k * d * d + 4 * k * k * d + 4 * k * d * mlp_hidden


def embed_flops(s: StepShape, patches: int) -> float:
  """Forward FLOPs of the patch embedding on `patches` patches (a matmul over their pixels)."""
  return 2 * patches * (s.patch_size**2 * 3) * s.width


def encoder_forward_flops(tokens: int, s: StepShape, embed_tokens: int) -> float:
  """Patch embedding on `embed_tokens` patches plus `depth` blocks on `tokens` tokens."""
  return embed_flops(s, embed_tokens) + s.depth * block_flops(tokens, s.width, s.mlp_hidden)


def step_flops(s: StepShape) -> float:
  """Matmul FLOPs of one train step per example (multiply by the batch size)."""
  target = encoder_forward_flops(s.num_patches, s, s.num_patches)
  # The context encoder embeds all N patches, then gathers Kc. The embedding's backward needs
  # only the kernel gradient (1x forward; the pixels need none), the blocks' both (2x).
  context = 2 * embed_flops(s, s.num_patches) + 3 * s.depth * block_flops(s.context_tokens, s.width,
                                                            s.mlp_hidden)
  k = s.context_tokens + s.target_tokens
  pred_fwd = (
      2 * s.context_tokens * s.width * s.pred_width             # Dense in, once on the context.
      + s.num_targets * (
          s.pred_depth * block_flops(k, s.pred_width, 4 * s.pred_width)
          + 2 * s.target_tokens * s.pred_width * s.width))      # Dense out on target tokens.
  proj = 0.0
  if s.projector:
    widths = (s.width,) + tuple(s.projector)
    proj = s.num_targets * sum(2 * a * b for a, b in zip(widths[:-1], widths[1:]))
  return target + context + 3 * (pred_fwd + proj)


def vit_forward_flops(width: int, depth: int, mlp_hidden: int, num_patches: int,
                      patch_size: int) -> tuple[float, float]:
  """Forward FLOPs per example of a ViT on all N patches: (patch embedding, the blocks)."""
  return (2 * num_patches * (patch_size**2 * 3) * width,
          depth * block_flops(num_patches, width, mlp_hidden))


def finetune_step_flops(width: int, depth: int, mlp_hidden: int, num_patches: int,
                        patch_size: int, num_classes: int) -> float:
  """Matmul FLOPs of one fine-tuning step per example: encoder on all N patches and the head,
  forward + backward (3x the forward; the patch embedding's backward 1x, as in `step_flops`)."""
  embed, blocks = vit_forward_flops(width, depth, mlp_hidden, num_patches, patch_size)
  return 2 * embed + 3 * (blocks + 2 * width * num_classes)


def peak_tflops(device: jax.Device | None = None, override: float = 0.0) -> float:
  """Per-device peak TFLOP/s: `override` when > 0, else the table entry, else 0 (MFU unknown)."""
  if override > 0:
    return float(override)
  device = device or jax.devices()[0]
  kind = getattr(device, 'device_kind', '')
  if kind in PEAK_TFLOPS:
    return PEAK_TFLOPS[kind]
  for name, value in PEAK_TFLOPS.items():  # e.g. 'NVIDIA H100 PCIe' -> 'NVIDIA H100'.
    if kind.startswith(name):
      return value
  return 0.0
