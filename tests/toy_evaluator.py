"""A toy evaluator: everything adding one takes is this file and its one `register` line.

'toy' predicts the train split's most frequent class, shifted by its option `shift`, for every
test example: top-1 is the share of test labels equal to it. Its trainer rows get `toy_top1`
(percent); the probe table gets its default row.
"""

import numpy as np

from cjepa_jax.evals import base
from cjepa_jax.evals import registry
from cjepa_jax.evals import units


def _check(name, options):
  base.check(isinstance(options.shift, int), name, 'shift', options.shift, 'an integer')


def _build(ctx, options):
  num_classes = int(ctx.data.num_classes)

  def probe(train_x, train_y, test_x, test_y):
    del train_x, test_x
    guess = (np.bincount(train_y, minlength=num_classes).argmax() + options.shift) % num_classes
    return dict(top1=float(np.mean(test_y == guess)))

  return base.per_kind(ctx, probe)


def _logged(out):
  (r,) = out.values()
  return units.monitor_to_percent({'toy_top1': r['top1']})


TYPE = registry.register(base.Type('toy', _build, check=_check, logged=_logged))
