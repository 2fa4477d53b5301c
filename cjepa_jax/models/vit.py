"""The I-JEPA Vision Transformer encoder (context encoder and EMA target encoder).

Matches the reference PyTorch code (facebookresearch/ijepa, src/models/vision_transformer.py):
conv patch embedding (kernel = stride = patch, with bias), no class token, a fixed 2-D sin-cos
position embedding, pre-norm blocks (LayerNorm eps 1e-6, fused-qkv attention with bias, exact-erf
GELU MLP), a final LayerNorm. Dropout and drop-path are 0 in every reference recipe: dropout is not
implemented; drop path (stochastic depth, for fine-tuning) is `Encoder.drop_path_rate`, 0 by
default, and does nothing unless the encoder is called with `train=True`.

Parameter layout (unscanned, `scan=False`), chosen so that a torch -> flax converter is a rename
plus transposes:

  patch_embed/kernel     [p, p, 3, D]   torch patch_embed.proj.weight [D, 3, p, p] -> (2, 3, 1, 0)
  patch_embed/bias       [D]
  blocks_{i}/norm1/scale, bias                [D]
  blocks_{i}/attn/qkv/kernel, bias            [D, 3D], [3D]  torch qkv.weight [3D, D] transposed;
                                              output columns are (q|k|v) x heads x head_dim as in
                                              the reference's reshape(B, N, 3, H, D/H).
  blocks_{i}/attn/proj/kernel, bias           [D, D], [D]
  blocks_{i}/norm2/scale, bias                [D]
  blocks_{i}/mlp/fc1/kernel, bias             [D, mlp], [mlp]
  blocks_{i}/mlp/fc2/kernel, bias             [mlp, D], [D]
  norm/scale, bias                            [D]

With `scan=True` the blocks live under one key `blocks` with the same sub-tree and every leaf
stacked on a leading layer axis ([depth, ...]). `scan_to_unscanned` / `unscanned_to_scan` convert
between the two layouts (checkpoints can be moved between them; the outputs are identical).
The position embedding is not a parameter: it is a numpy constant computed from the input's grid.

Precision (deliberate, to mirror the reference's bfloat16 autocast): parameters are float32;
Dense / conv / attention run in `dtype`; LayerNorms run in float32 and the residual stream is kept
in float32 (in torch autocast `x + bf16_branch` promotes to float32 and layer_norm runs in
float32). The returned tokens are cast to `dtype`.
"""

from __future__ import annotations

from collections.abc import Mapping
import functools
import re
from typing import Any

import einops
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

# width / depth / heads / mlp_ratio of each size, as in the reference's vit_tiny ... vit_giant.
VARIANTS: dict[str, dict] = {
    'Ti': dict(width=192, depth=12, num_heads=3, mlp_ratio=4.0),
    'S': dict(width=384, depth=12, num_heads=6, mlp_ratio=4.0),
    'B': dict(width=768, depth=12, num_heads=12, mlp_ratio=4.0),
    'L': dict(width=1024, depth=24, num_heads=16, mlp_ratio=4.0),
    'H': dict(width=1280, depth=32, num_heads=16, mlp_ratio=4.0),
    'g': dict(width=1408, depth=40, num_heads=16, mlp_ratio=48 / 11),
}

LN_EPS = 1e-6
INIT_STD = 0.02

# torch.nn.init.trunc_normal_(std=.02, a=-2, b=2): the bounds are absolute, i.e. +-100 std, so it
# is effectively an untruncated normal. jax's bounds are in units of std, hence 2 / 0.02.
dense_init = jax.nn.initializers.truncated_normal(
    stddev=INIT_STD, lower=-2.0 / INIT_STD, upper=2.0 / INIT_STD)

# `implementation` of jax.nn.dot_product_attention: 'xla' (any backend; the default) or 'cudnn'
# (cuDNN's fused flash attention: NVIDIA GPUs, bfloat16 / float16 only).
ATTENTION_IMPLS = ('xla', 'cudnn')

# jax.checkpoint_policies that are policies themselves (the others are factories needing names).
_REMAT_POLICIES = (
    'checkpoint_dots', 'checkpoint_dots_with_no_batch_dims', 'dots_saveable',
    'dots_with_no_batch_dims_saveable', 'everything_saveable', 'nothing_saveable')


def parse_variant(variant: str) -> tuple[dict, int]:
  """Parses '<size>/<patch>' (e.g. 'Ti/4', 'H/14', 'g/16') into (VARIANTS[size] copy, patch)."""
  m = re.fullmatch(r'([A-Za-z]+)/(\d+)', variant) if isinstance(variant, str) else None
  if m is None or m.group(1) not in VARIANTS or int(m.group(2)) <= 0:
    raise ValueError(
        f'Bad ViT variant {variant!r}: expected "<size>/<patch>" with size one of '
        f'{sorted(VARIANTS)} and a positive integer patch, e.g. "H/14" or "Ti/4".')
  return dict(VARIANTS[m.group(1)]), int(m.group(2))


def mlp_dim(width: int, mlp_ratio: float) -> int:
  """MLP hidden size, int(width * mlp_ratio) as the reference (giant: int(1408 * 48/11) = 6144)."""
  return int(width * mlp_ratio)


def patch_grid(image_hw: tuple[int, int], patch: int) -> tuple[int, int]:
  """(H, W) in pixels -> (H / patch, W / patch); ValueError when the patch doesn't divide them."""
  h, w = image_hw
  if h % patch or w % patch:
    raise ValueError(
        f'Image size {h}x{w} is not divisible by the patch size {patch}: resize or crop the '
        f'images to a multiple of {patch}.')
  return h // patch, w // patch


def sincos_pos_embed_2d(grid_h: int, grid_w: int, dim: int) -> np.ndarray:
  """Fixed MAE / I-JEPA 2-D sin-cos position embedding, `[grid_h * grid_w, dim]` float32.

  Tokens are in raster order (index = row * grid_w + col). As in the reference (whose meshgrid
  puts w first), the first dim/2 channels encode the column and the last dim/2 the row; each half
  is [sin(pos * omega), cos(pos * omega)] with omega_k = 1 / 10000^(k / (dim/4)), k < dim/4.
  The reference only builds square grids; the same formula is used for non-square ones.
  """
  if dim % 4:
    raise ValueError(f'sin-cos position embedding needs dim divisible by 4, got {dim}.')
  omega = 1.0 / 10000 ** (np.arange(dim // 4, dtype=np.float64) / (dim / 4))
  rows, cols = np.meshgrid(np.arange(grid_h, dtype=np.float64),
                           np.arange(grid_w, dtype=np.float64), indexing='ij')

  def embed_1d(pos):  # [N] -> [N, dim/2]
    out = np.outer(pos.reshape(-1), omega)
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)

  return np.concatenate([embed_1d(cols), embed_1d(rows)], axis=1).astype(np.float32)


def key_mask(valid: jax.Array | None) -> jax.Array | None:
  """[B, K] bool -> [B, 1, 1, K] attention mask: padded tokens are never attended to as keys."""
  return None if valid is None else valid[:, None, None, :].astype(bool)


class Attention(nn.Module):
  """Multi-head self-attention with a fused qkv projection: [B, K, D] -> [B, K, D].

  `attention_impl` picks jax.nn.dot_product_attention's kernel (ATTENTION_IMPLS); both compute the
  same function, so parameters and checkpoints do not depend on it.
  """
  num_heads: int
  dtype: Any = jnp.float32
  attention_impl: str = 'xla'

  @nn.compact
  def __call__(self, x: jax.Array, mask: jax.Array | None = None) -> jax.Array:
    """x [B, K, D]; mask [B, 1, 1, K] bool (True = may be attended to) or None."""
    d = x.shape[-1]
    if d % self.num_heads:
      raise ValueError(f'width {d} is not divisible by num_heads {self.num_heads}.')
    dense = functools.partial(nn.Dense, dtype=self.dtype, kernel_init=dense_init,
                              bias_init=nn.initializers.zeros)
    qkv = dense(3 * d, name='qkv')(x)
    # Column order (3, heads, head_dim), the reference's reshape(B, N, 3, H, D/H).
    q, k, v = einops.rearrange(qkv, 'b k (three h c) -> three b k h c', three=3,
                               h=self.num_heads)
    y = jax.nn.dot_product_attention(q, k, v, mask=mask,  # scale 1/sqrt(head_dim).
                                     implementation=self.attention_impl)
    return dense(d, name='proj')(einops.rearrange(y, 'b k h c -> b k (h c)'))


class Mlp(nn.Module):
  """Dense -> GELU (exact erf, torch's nn.GELU default) -> Dense."""
  hidden: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    dense = functools.partial(nn.Dense, dtype=self.dtype, kernel_init=dense_init,
                              bias_init=nn.initializers.zeros)
    y = dense(self.hidden, name='fc1')(x)
    y = nn.gelu(y, approximate=False)
    return dense(x.shape[-1], name='fc2')(y)


def layer_norm(name: str) -> nn.LayerNorm:
  """LayerNorm eps 1e-6, computed and returned in float32 (autocast runs layer_norm in float32)."""
  return nn.LayerNorm(epsilon=LN_EPS, dtype=jnp.float32, name=name)


class Block(nn.Module):
  """Pre-norm transformer block: x + attn(norm1(x)); x + mlp(norm2(x)). [B, K, D] float32.

  `drop_path` > 0 with `deterministic=False`: each branch is dropped per example with that
  probability and the kept ones scaled by 1 / (1 - drop_path) (stochastic depth, as timm's
  DropPath); it needs a 'dropout' rng. Otherwise the block is exactly the reference's.
  """
  num_heads: int
  mlp_dim: int
  dtype: Any = jnp.float32
  attention_impl: str = 'xla'
  drop_path: float = 0.0
  deterministic: bool = True

  def _drop_path(self, y: jax.Array) -> jax.Array:
    if self.deterministic or self.drop_path == 0.0:
      return y
    keep = 1.0 - self.drop_path
    shape = (y.shape[0],) + (1,) * (y.ndim - 1)       # One draw per example.
    kept = jax.random.bernoulli(self.make_rng('dropout'), keep, shape)
    return jnp.where(kept, y / keep, jnp.zeros_like(y))

  @nn.compact
  def __call__(self, x: jax.Array, mask: jax.Array | None = None) -> jax.Array:
    attn = Attention(self.num_heads, self.dtype, self.attention_impl, name='attn')
    x = x + self._drop_path(attn(layer_norm('norm1')(x), mask))
    x = x + self._drop_path(Mlp(self.mlp_dim, self.dtype, name='mlp')(layer_norm('norm2')(x)))
    return x


def _remat_block_cls(remat_policy: str, scan: bool) -> type[nn.Module]:
  """Block, wrapped in nn.remat as `remat_policy` asks ('none', 'full' or a policy name)."""
  if remat_policy == 'none':
    return Block
  if remat_policy == 'full':
    policy = None  # Save nothing: recompute the whole block in the backward pass.
  elif remat_policy in _REMAT_POLICIES:
    policy = getattr(jax.checkpoint_policies, remat_policy)
  else:
    raise ValueError(
        f'Unknown remat_policy {remat_policy!r}: use "none", "full" or one of {_REMAT_POLICIES}.')
  # prevent_cse is unnecessary (and slower) inside scan, see the jax.checkpoint docs.
  return nn.remat(Block, policy=policy, prevent_cse=not scan)


def transformer_blocks(x: jax.Array, valid: jax.Array | None, *, depth: int, num_heads: int,
                       mlp_dim: int, dtype: Any, remat_policy: str = 'none', scan: bool = False,
                       attention_impl: str = 'xla', return_intermediates: bool = False,
                       drop_path_rate: float = 0.0, deterministic: bool = True
                       ) -> tuple[jax.Array, jax.Array | None]:
  """Runs `depth` Blocks; call it from inside a compact method (the blocks become its children).

  Args:
    x: [B, K, D] tokens (the residual stream is float32).
    valid: [B, K] bool, False for padded tokens (excluded as attention keys), or None.
    depth, num_heads, mlp_dim, dtype: the block configuration.
    remat_policy: 'none', 'full' or a jax.checkpoint_policies name.
    scan: nn.scan over the blocks (params `blocks`, stacked [depth, ...]) instead of a Python loop
      (params `blocks_0` ... `blocks_{depth-1}`).
    attention_impl: jax.nn.dot_product_attention's implementation, one of ATTENTION_IMPLS.
    return_intermediates: also return every block's output.
    drop_path_rate: stochastic depth of the last block; block i gets
      drop_path_rate * i / (depth - 1) (timm's / MAE's linear rule). Used only when
      `deterministic` is False; not with `scan` (the rates differ per block).
    deterministic: no drop path (evaluation, pretraining).
  Returns:
    ([B, K, D] float32 output of the last block, [depth, B, K, D] block outputs in `dtype` or None).
  """
  if attention_impl not in ATTENTION_IMPLS:
    raise ValueError(f'Unknown attention implementation {attention_impl!r}: use one of '
                     f'{ATTENTION_IMPLS}.')
  if not 0.0 <= drop_path_rate < 1.0:
    raise ValueError(f'drop_path_rate={drop_path_rate} must be in [0, 1).')
  if scan and drop_path_rate > 0.0:
    raise ValueError('drop_path_rate > 0 needs model.scan=False (each block has its own rate).')
  rates = np.linspace(0.0, drop_path_rate, depth) if depth > 1 else np.zeros(depth)
  mask = key_mask(valid)
  block_cls = _remat_block_cls(remat_policy, scan)
  x = x.astype(jnp.float32)
  if scan:
    def body(block, carry, mask):
      carry = block(carry, mask)
      return carry, (carry.astype(dtype) if return_intermediates else None)
    scanned = nn.scan(body, variable_axes={'params': 0}, split_rngs={'params': True},
                      in_axes=nn.broadcast, length=depth)
    x, inter = scanned(block_cls(num_heads, mlp_dim, dtype, attention_impl, name='blocks'), x,
                       mask)
    return x, inter
  outs = []
  for i in range(depth):
    x = block_cls(num_heads, mlp_dim, dtype, attention_impl, drop_path=float(rates[i]),
                  deterministic=deterministic, name=f'blocks_{i}')(x, mask)
    if return_intermediates:
      outs.append(x.astype(dtype))
  return x, (jnp.stack(outs) if return_intermediates else None)


def scan_to_unscanned(params: Any) -> Any:
  """Splits every `blocks` sub-tree (leaves [depth, ...]) into `blocks_0` ... `blocks_{depth-1}`.

  Recurses through nested dicts, so it works on an Encoder's or Predictor's params or on a whole
  state holding both. Non-dict leaves are returned unchanged.
  """
  if not isinstance(params, Mapping):
    return params
  out = {}
  for k, v in params.items():
    if k == 'blocks':
      depth = jax.tree.leaves(v)[0].shape[0]
      for i in range(depth):
        out[f'blocks_{i}'] = jax.tree.map(lambda a, i=i: a[i], v)
    else:
      out[k] = scan_to_unscanned(v)
  return out


def unscanned_to_scan(params: Any) -> Any:
  """Stacks `blocks_0` ... `blocks_{n-1}` into one `blocks` sub-tree (leaves [n, ...])."""
  if not isinstance(params, Mapping):
    return params
  out, blocks = {}, {}
  for k, v in params.items():
    m = re.fullmatch(r'blocks_(\d+)', k)
    if m:
      blocks[int(m.group(1))] = v
    else:
      out[k] = unscanned_to_scan(v)
  if blocks:
    if sorted(blocks) != list(range(len(blocks))):
      raise ValueError(f'Block indices must be 0..n-1, got {sorted(blocks)}.')
    out['blocks'] = jax.tree.map(lambda *a: jnp.stack(a), *[blocks[i] for i in range(len(blocks))])
  return out


class Encoder(nn.Module):
  """I-JEPA ViT encoder: images [B, H, W, 3] -> tokens [B, K, D].

  Attributes:
    variant: '<size>/<patch>', size in VARIANTS (e.g. 'H/14', 'Ti/4').
    dtype: compute dtype (params are always float32).
    remat_policy: 'none', 'full' or a jax.checkpoint_policies name.
    scan: nn.scan over the blocks (stacked params, see the module docstring).
    depth: optional override of the variant's depth (None = the variant's); for small recipes and
      tests, not a reference model.
    attention_impl: the attention kernel, one of ATTENTION_IMPLS ('xla' or 'cudnn').
    drop_path_rate: stochastic depth of the last block (linear from 0 over the blocks), applied
      only in `__call__(..., train=True)`; 0 (the reference's) by default.
  """
  variant: str
  dtype: Any = jnp.float32
  remat_policy: str = 'none'
  scan: bool = False
  depth: int | None = None
  attention_impl: str = 'xla'
  drop_path_rate: float = 0.0

  @property
  def spec(self) -> dict:
    """The resolved size: width, depth (override applied), num_heads, mlp_dim, patch."""
    v, patch = parse_variant(self.variant)
    depth = v['depth'] if self.depth is None else self.depth
    return dict(width=v['width'], depth=depth, num_heads=v['num_heads'],
                mlp_dim=mlp_dim(v['width'], v['mlp_ratio']), patch=patch)

  @property
  def width(self) -> int:
    return self.spec['width']

  @property
  def num_heads(self) -> int:
    return self.spec['num_heads']

  @property
  def num_layers(self) -> int:
    return self.spec['depth']

  @property
  def patch_size(self) -> int:
    return self.spec['patch']

  @nn.compact
  def __call__(self, images: jax.Array, indices: jax.Array | None = None,
               valid: jax.Array | None = None, return_intermediates: bool = False,
               train: bool = False) -> jax.Array | tuple[jax.Array, jax.Array]:
    """Encodes the tokens at `indices` of each image.

    Args:
      images: [B, H, W, C] (H, W multiples of the patch; C = 3 for the reference models).
      indices: [B, K] int patch indices in raster order (row * grid_w + col), or None for all
        N = (H/p) * (W/p) patches. Padded slots may hold any value: indices are clipped to [0, N).
      valid: [B, K] bool (or [B, N] when indices is None); False marks padded slots, which are
        excluded as attention keys so they cannot change the valid tokens' outputs. None: all valid.
      return_intermediates: also return every block's output.
      train: apply drop path (`drop_path_rate` > 0 needs a 'dropout' rng); False: none.
    Returns:
      [B, K, D] final-LayerNormed tokens in `dtype`; with return_intermediates also
      [depth, B, K, D], each block's output BEFORE the final LayerNorm, in `dtype` (apply
      `norm` yourself if a probe wants normed features; the last entry, normed, is the output).
    """
    s = self.spec
    if images.ndim != 4:
      raise ValueError(f'images must be [B, H, W, C], got shape {images.shape}.')
    if s['depth'] <= 0:
      raise ValueError(f'depth must be positive, got {s["depth"]}.')
    grid = patch_grid(images.shape[1:3], s['patch'])
    p = s['patch']
    x = nn.Conv(s['width'], (p, p), strides=(p, p), padding='VALID', dtype=self.dtype,
                kernel_init=dense_init, bias_init=nn.initializers.zeros,
                name='patch_embed')(images)
    x = x.reshape(x.shape[0], grid[0] * grid[1], s['width'])  # Raster order, as torch flatten(2).
    # Fixed embedding added in float32 (torch: bf16 conv output + float32 pos_embed -> float32).
    x = x.astype(jnp.float32) + sincos_pos_embed_2d(*grid, s['width'])[None]
    num_tokens = x.shape[1]
    if indices is not None:
      if indices.ndim != 2 or indices.shape[0] != x.shape[0]:
        raise ValueError(f'indices must be [B, K] with B = {x.shape[0]}, got {indices.shape}.')
      x = jnp.take_along_axis(x, indices[..., None].astype(jnp.int32), axis=1, mode='clip')
    if valid is not None and valid.shape != x.shape[:2]:
      raise ValueError(f'valid must be [B, K] = {x.shape[:2]} (the shape of indices, or [B, N] '
                       f'with N = {num_tokens} when indices is None), got {valid.shape}.')
    x, inter = transformer_blocks(
        x, valid, depth=s['depth'], num_heads=s['num_heads'], mlp_dim=s['mlp_dim'],
        dtype=self.dtype, remat_policy=self.remat_policy, scan=self.scan,
        attention_impl=self.attention_impl, return_intermediates=return_intermediates,
        drop_path_rate=self.drop_path_rate, deterministic=not train)
    out = layer_norm('norm')(x).astype(self.dtype)
    return (out, inter) if return_intermediates else out
