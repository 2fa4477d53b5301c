"""The fine-tuning classifier: a JEPA encoder, average-pooled, LayerNorm, linear head.

  images [B, H, W, 3] -> encoder tokens [B, N, D] (final LayerNorm applied) -> mean over N
  -> LayerNorm (`head_norm`) -> Dense (`head`) -> logits [B, C] float32.

JEPA encoders have no class token, so the head pools the tokens, as MAE's `global_pool`
fine-tuning (which the I-JEPA and C-JEPA papers follow). Deviation: MAE drops the encoder's final
norm and normalises the pooled vector only; we keep the pretrained final norm (it is part of the
encoder the probes evaluate) and add the head's own LayerNorm on the pooled vector. The head's
kernel starts at trunc_normal(std 2e-5) and its bias at 0 (MAE), so the first logits are ~0.

Parameters: {'encoder': <vit.Encoder's>, 'head_norm': {scale, bias}, 'head': {kernel, bias}}:
`params['encoder']` is exactly what a pretraining checkpoint's `target_params` holds.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from cjepa_jax.models import vit

HEAD_INIT_STD = 2e-5  # MAE: trunc_normal_(head.weight, std=2e-5).


class Classifier(nn.Module):
  """`encoder` + mean pool + LayerNorm + linear head over `num_classes`."""
  encoder: vit.Encoder
  num_classes: int

  @nn.compact
  def __call__(self, images: jax.Array, train: bool = False) -> jax.Array:
    """images [B, H, W, 3] -> logits [B, num_classes] float32; `train` turns drop path on."""
    tokens = self.encoder(images, train=train)                    # [B, N, D]
    pooled = jnp.mean(tokens.astype(jnp.float32), axis=1)         # [B, D]
    pooled = nn.LayerNorm(epsilon=vit.LN_EPS, dtype=jnp.float32, name='head_norm')(pooled)
    init = jax.nn.initializers.truncated_normal(stddev=HEAD_INIT_STD)
    return nn.Dense(self.num_classes, dtype=jnp.float32, kernel_init=init,
                    bias_init=nn.initializers.zeros, name='head')(pooled)
