"""Fine-tuning's evaluation of a classifier: the evaluator type 'classify'.

The clean centre crops of `data.eval_split` (its first / a seeded subset of `eval_examples` when
> 0, see `input_pipeline.make_eval_iterator`), in batches of `eval_batch_size` (0: the run's
`batch_size`): top-1 / top-5 in percent and the mean cross-entropy, logged as `eval_top1`,
`eval_top5`, `eval_loss` and `eval_examples` (fine-tuning's rows have always held percentages).
It evaluates a classifier's parameters (models/classifier.py), not an encoder's features, so it
runs where a classifier is trained.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from cjepa_jax import sharding
from cjepa_jax.evals import base
from cjepa_jax.models import classifier as classifier_lib

Batch = dict[str, jax.Array]


def make_eval_step(model: classifier_lib.Classifier) -> Callable[[Any, Batch], dict[str, Any]]:
  """`eval_step(params, batch)`: sums over the valid examples of top-1 / top-5 hits and of the
  cross-entropy, and their count (the host adds the batches up)."""

  def eval_step(params: Any, batch: Batch) -> dict[str, jax.Array]:
    logits = model.apply({'params': params}, batch['image'])
    labels, w = batch['label'], batch['valid'].astype(jnp.float32)
    top5 = jax.lax.top_k(logits, min(5, logits.shape[-1]))[1]
    ce = -jnp.take_along_axis(jax.nn.log_softmax(logits), labels[:, None], axis=-1)[:, 0]
    return dict(top1=jnp.sum(w * (top5[:, 0] == labels)),
                top5=jnp.sum(w * jnp.any(top5 == labels[:, None], axis=-1)),
                loss=jnp.sum(w * ce), count=jnp.sum(w))

  return eval_step


def _build(ctx: base.Context, o: base.Options) -> base.Evaluator:
  """`evaluate(classifier params) -> {'eval_top1', 'eval_top5', 'eval_loss', 'eval_examples'}`.

  Every process reads its part; the sums are over the global batch (padded rows excluded).
  """
  data, mesh = ctx.data, ctx.mesh
  batch_size = int(o.eval_batch_size or data.batch_size)
  sharding.check_batch_divisible(batch_size, mesh, jax.process_count())
  batch_sharding = sharding.batch_sharding(mesh)
  eval_step = jax.jit(make_eval_step(ctx.model), out_shardings=sharding.replicated(mesh))

  def evaluate(params: Any) -> dict[str, Any]:
    from cjepa_jax.data import input_pipeline  # pylint: disable=g-import-not-at-top  (TF: host only)
    totals = None
    for batch in input_pipeline.make_eval_iterator(
        data, data.eval_split, batch_size=batch_size,
        num_examples=int(o.eval_examples) or None):
      batch.pop('data_skipped', None)
      batch.pop('pos', None)
      out = eval_step(params, input_pipeline.to_global_array(batch, batch_sharding))
      totals = out if totals is None else jax.tree.map(lambda a, b: a + b, totals, out)
    host = {k: float(v) for k, v in jax.device_get(totals).items()}
    n = max(host['count'], 1.0)
    return dict(eval_top1=100.0 * host['top1'] / n, eval_top5=100.0 * host['top5'] / n,
                eval_loss=host['loss'] / n, eval_examples=int(host['count']))

  return base.Evaluator(evaluate)


def _logged(out: base.Results) -> dict[str, Any]:
  return out


TYPE = base.Type('classify', _build, logged=_logged, reads_features=False)
