"""VICReg-style projector (expander) for the C-JEPA 'blocks' reading.

Layout as the official VICReg `Projector`, from a spec 'h1-h2-...-out' (config `vicreg.projector`):
Dense(h1) -> BatchNorm -> ReLU -> ... -> Dense(out, no bias).

Deliberate deviations from the official code:
  * Normalisation 'batch' (default) is BatchNorm in training mode only: it normalises with the
    statistics of the batch passed in (biased variance, eps 1e-5, learnable scale/bias, as
    torch's BatchNorm1d in `train()`), and keeps NO running averages. The projector exists only
    inside the pretraining loss, where torch always runs it in training mode, so the running
    averages are never read; dropping them keeps the train state a pure `params` tree (no mutable
    `batch_stats`). Statistics are over every leading axis (e.g. all B x M blocks) and, under jit
    with a sharded batch, over the global batch like SyncBatchNorm in the official code. An
    optional `valid` mask keeps padded rows out of the statistics. 'layer' (LayerNorm) and
    'none' are offered for ablations.
  * Kernels use torch's default Linear init (uniform +-1/sqrt(fan_in)); biases start at 0
    instead of torch's uniform draw. With BatchNorm the hidden Dense layers have no bias: the
    batch mean subtraction cancels it exactly, so it could only ever receive float noise.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import linen as nn

NORMS = ('batch', 'layer', 'none')
BN_EPS = 1e-5  # torch BatchNorm1d default.

# torch.nn.Linear default: kaiming_uniform(a=sqrt(5)) == U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
torch_linear_init = nn.initializers.variance_scaling(1 / 3, 'fan_in', 'uniform')


def parse_spec(spec: str) -> tuple[int, ...]:
  """'2048-2048-2048' -> (2048, 2048, 2048); raises ValueError on a malformed spec."""
  try:
    widths = tuple(int(w) for w in spec.split('-'))
  except ValueError:
    widths = ()
  if not widths or any(w <= 0 for w in widths):
    raise ValueError(f"Bad projector spec {spec!r}: want positive widths joined by '-', e.g. "
                     "'2048-2048-2048' (config vicreg.projector).")
  return widths


class BatchNormTrain(nn.Module):
  """Training-mode batch norm over all leading axes, without running statistics."""

  @nn.compact
  def __call__(self, x: jax.Array, valid: jax.Array | None = None) -> jax.Array:
    axes = tuple(range(x.ndim - 1))
    if valid is None:
      valid = jnp.ones(x.shape[:-1], bool)
    v = valid[..., None]
    n = jnp.maximum(jnp.sum(valid, dtype=jnp.float32), 1.0)
    mean = jnp.sum(jnp.where(v, x, 0.0), axis=axes) / n
    # Mask before squaring, so garbage in padded rows cannot reach the gradient (0 * NaN).
    xc = jnp.where(v, x - mean, 0.0)
    var = jnp.sum(jnp.square(xc), axis=axes) / n
    y = (x - mean) * jax.lax.rsqrt(var + BN_EPS)
    scale = self.param('scale', nn.initializers.ones, (x.shape[-1],), jnp.float32)
    bias = self.param('bias', nn.initializers.zeros, (x.shape[-1],), jnp.float32)
    return y * scale + bias


class Projector(nn.Module):
  """MLP expander [..., D] -> float32 [..., P], P the last width of `spec`.

  Attributes:
    spec: widths 'h1-...-out' (at least one; a single width is one bias-free Dense).
    norm: 'batch' (training-mode BatchNorm, see the module docstring), 'layer' or 'none'.
  """
  spec: str = '2048-2048-2048'
  norm: str = 'batch'

  @nn.compact
  def __call__(self, x: jax.Array, valid: jax.Array | None = None) -> jax.Array:
    """Args: x [..., D]; valid: optional [...] bool, rows kept out of the batch statistics."""
    widths = parse_spec(self.spec)
    if self.norm not in NORMS:
      raise ValueError(f'Unknown projector norm {self.norm!r}: use one of {NORMS}.')
    x = jnp.asarray(x, jnp.float32)
    if valid is not None:  # Padded rows: finite zeros, so no NaN reaches a Dense gradient.
      x = jnp.where(valid[..., None], x, 0.0)
    for i, w in enumerate(widths[:-1]):
      # BatchNorm subtracts the batch mean, so a bias before it has an identically zero gradient
      # (Adam would turn its float noise into O(lr) steps): leave it out, an exact equivalence.
      x = nn.Dense(w, use_bias=self.norm != 'batch', kernel_init=torch_linear_init,
                   name=f'dense_{i}')(x)
      if self.norm == 'batch':
        x = BatchNormTrain(name=f'norm_{i}')(x, valid)
      elif self.norm == 'layer':
        x = nn.LayerNorm(epsilon=BN_EPS, name=f'norm_{i}')(x)
      x = nn.relu(x)
    return nn.Dense(widths[-1], use_bias=False, kernel_init=torch_linear_init,
                    name=f'dense_{len(widths) - 1}')(x)
