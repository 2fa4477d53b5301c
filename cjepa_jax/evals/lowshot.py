"""The low-shot linear probe: the evaluator type 'lowshot'.

The linear probe (linear.py: its grid, holdout and retraining, the entry's `lrs`, `wds`,
`batch_size`, `holdout_fraction`, `retrain`) fitted on a seeded, class-balanced `fractions` of the
train labels (`linear.lowshot_indices`; 1%: the I-JEPA paper's ImageNet protocol) for `epochs`
epochs, and tested on the whole test split.
"""

from __future__ import annotations

from typing import Any

from cjepa_jax.evals import base
from cjepa_jax.evals import linear


def _check(name: str, o: base.Options) -> None:
  fractions = tuple(o.fractions)
  base.check(len(fractions) > 0 and all(0 < f <= 1 for f in fractions), name, 'fractions',
             fractions, 'each must be in (0, 1], e.g. (0.01, 0.1)')
  linear.check_options(name, o)


def _build(ctx: base.Context, o: base.Options) -> base.Evaluator:
  """{kind: {'1%': linear result, ...}} per feature kind of the context."""
  num_classes, seed = int(ctx.data.num_classes), int(ctx.data.seed)
  options = linear.probe_options(o, ctx)

  def probe(train_x, train_y, test_x, test_y):
    out = {}
    for fraction in o.fractions:
      idx = linear.lowshot_indices(train_y, float(fraction), seed, num_classes)
      r = linear.linear_probe(train_x[idx], train_y[idx], test_x, test_y, **options)
      out[f'{100 * float(fraction):g}%'] = dict(
          {k: v for k, v in r.items() if k != 'sweep'}, fraction=float(fraction),
          num_train=int(len(idx)))
    return out

  return base.per_kind(ctx, probe)


def _entry(out: base.Results, chosen: str, o: base.Options) -> dict[str, Any]:
  del o
  return dict(fractions=out[chosen], features=chosen,
              per_features={kd: {f: dict(top1=r['top1'], top5=r['top5']) for f, r in fr.items()}
                            for kd, fr in out.items()})


def _rows(name: str, e: dict[str, Any]) -> list[tuple[Any, ...]]:
  return [(f'{name} {label} labels', e['features'], r['top1'], r['top5'],
           f'   {r["num_train"]} examples, lr={r["best_lr"]:g} wd={r["best_wd"]:g}')
          for label, r in e['fractions'].items()]


def _card_rows(name: str, e: dict[str, Any]) -> list[tuple[str, ...]]:
  del name
  return [(f'linear, {label} labels', e.get('features', ''), base.card_percent(f.get('top1')),
           base.card_percent(f.get('top5')), f'{f.get("num_train", "?")} examples')
          for label, f in (e.get('fractions') or {}).items()]


TYPE = base.Type('lowshot', _build, check=_check, entry=_entry, rows=_rows, card_rows=_card_rows,
                 card_protocol='low-shot: the linear probe fitted on a class-balanced fraction of '
                               'the train labels')
