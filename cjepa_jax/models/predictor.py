"""The narrow I-JEPA predictor (reference: VisionTransformerPredictor in facebookresearch/ijepa).

context tokens [B, Kc, D] --Dense--> [B, Kc, width] + sin-cos(context positions);
per target block m: mask_token + sin-cos(target positions) -> [Kt, width];
[context; targets of block m] -> `depth` pre-norm blocks -> LayerNorm -> target tokens -> Dense(D).
Every target block is its own pass (M is folded into the batch), so blocks never see each other,
as in the reference (which repeats the context once per mask along the batch).

Static shapes: contexts are padded to Kc and target blocks to Kt with validity masks. Padded
tokens are excluded as attention keys, so they cannot change any valid output; the outputs at
padded target slots are garbage the loss must ignore.

Parameter layout (unscanned; with `scan=True` the blocks are one stacked `blocks` sub-tree, see
vit.scan_to_unscanned / vit.unscanned_to_scan):

  predictor_embed/kernel, bias   [D, width], [width]     torch predictor_embed (weight transposed)
  mask_token                     [1, 1, width]           torch mask_token
  blocks_{i}/...                 as the encoder's blocks  torch predictor_blocks.{i}
  predictor_norm/scale, bias     [width]                 torch predictor_norm
  predictor_proj/kernel, bias    [width, D], [D]         torch predictor_proj (weight transposed)

The reference builds its position embedding for a square grid of num_patches; here `grid` may be
any (h, w) and must equal the encoder's patch grid. Precision as in vit.py: float32 residual
stream and LayerNorms, Dense / attention in `dtype`, output cast to `dtype`.
"""

from __future__ import annotations

from typing import Any

import einops
import flax.linen as nn
import jax
import jax.numpy as jnp

from cjepa_jax.models import vit


class Predictor(nn.Module):
  """Predicts the target encoder's tokens of M target blocks from the context tokens.

  Attributes:
    embed_dim: encoder width D (input and output size).
    num_heads: attention heads (the reference uses the encoder's).
    grid: (grid_h, grid_w) patch grid of the images; indices are raster-order into it.
    width: predictor width (384 in every reference recipe).
    depth: number of blocks (12 for the ViT-H recipes, 16 for ViT-g).
    dtype, remat_policy, scan, attention_impl: as vit.Encoder.
  """
  embed_dim: int
  num_heads: int
  grid: tuple[int, int]
  width: int = 384
  depth: int = 12
  dtype: Any = jnp.float32
  remat_policy: str = 'none'
  scan: bool = False
  attention_impl: str = 'xla'

  @nn.compact
  def __call__(self, ctx: jax.Array, ctx_idx: jax.Array, ctx_valid: jax.Array,
               tgt_idx: jax.Array, tgt_valid: jax.Array) -> jax.Array:
    """Predicts every target block.

    Args:
      ctx: [B, Kc, D] context-encoder output.
      ctx_idx: [B, Kc] int patch indices of the context tokens (padded slots: any value, clipped).
      ctx_valid: [B, Kc] bool, False at padded context slots.
      tgt_idx: [B, M, Kt] int patch indices of the M target blocks.
      tgt_valid: [B, M, Kt] bool, False at padded target slots.
    Returns:
      [B, M, Kt, D] predictions in `dtype` (padded target slots hold outputs to be ignored).
    """
    b, kc, d = ctx.shape
    if d != self.embed_dim:
      raise ValueError(f'ctx has width {d} but the predictor was built for embed_dim '
                       f'{self.embed_dim}: pass the encoder width.')
    if ctx_idx.shape != (b, kc) or ctx_valid.shape != (b, kc):
      raise ValueError(f'ctx_idx and ctx_valid must be [B, Kc] = {(b, kc)}, got '
                       f'{ctx_idx.shape} and {ctx_valid.shape}.')
    if tgt_idx.ndim != 3 or tgt_idx.shape[0] != b or tgt_valid.shape != tgt_idx.shape:
      raise ValueError(f'tgt_idx and tgt_valid must both be [B, M, Kt] with B = {b}, got '
                       f'{tgt_idx.shape} and {tgt_valid.shape}.')
    if self.width % self.num_heads:
      raise ValueError(f'predictor width {self.width} is not divisible by num_heads '
                       f'{self.num_heads}.')
    m = tgt_idx.shape[1]
    pos = jnp.asarray(vit.sincos_pos_embed_2d(*self.grid, self.width))  # [N, width] constant.

    x = nn.Dense(self.width, dtype=self.dtype, kernel_init=vit.dense_init,
                 bias_init=nn.initializers.zeros, name='predictor_embed')(ctx)
    x = x.astype(jnp.float32) + jnp.take(pos, ctx_idx, axis=0, mode='clip')  # [B, Kc, width]

    mask_token = self.param('mask_token', vit.dense_init, (1, 1, self.width), jnp.float32)
    t = mask_token[None] + jnp.take(pos, tgt_idx, axis=0, mode='clip')  # [B, M, Kt, width]

    # One pass per target block: repeat the context M times and fold M into the batch.
    x = jnp.concatenate([einops.repeat(x, 'b k c -> (b m) k c', m=m),
                         einops.rearrange(t, 'b m k c -> (b m) k c')], axis=1)
    valid = jnp.concatenate([einops.repeat(ctx_valid.astype(bool), 'b k -> (b m) k', m=m),
                             einops.rearrange(tgt_valid.astype(bool), 'b m k -> (b m) k')], axis=1)
    x, _ = vit.transformer_blocks(
        x, valid, depth=self.depth, num_heads=self.num_heads, mlp_dim=4 * self.width,
        dtype=self.dtype, remat_policy=self.remat_policy, scan=self.scan,
        attention_impl=self.attention_impl)
    x = vit.layer_norm('predictor_norm')(x[:, kc:])  # Keep the target tokens.
    x = nn.Dense(d, dtype=self.dtype, kernel_init=vit.dense_init,
                 bias_init=nn.initializers.zeros, name='predictor_proj')(x)
    return einops.rearrange(x, '(b m) k c -> b m k c', m=m).astype(self.dtype)
