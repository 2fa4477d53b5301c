r"""Accuracy against pretraining budget, one curve per objective (RESULTS.md).

  python experiments/cifar10/budget_plot.py --out results/cifar10_budgets.png \
      --summary results/cifar10_budgets_summary.json --baseline 'random init=runs/probe17/random' \
      'I-JEPA@1=runs/probe17/ijepa_781' 'I-JEPA@4=runs/probe17/ijepa_3124' ...

Each argument is `LABEL@EPOCHS=PATH`, PATH the `cjepa-probe` workdir (or a copy of its
`probe_results.json`, as in `results/probes17/`) of the checkpoint of that many epochs. Writes one
PNG with a panel per evaluator the runs have (linear, kNN, 10-shot, ...: `probe_table.COLUMNS`),
test top-1 in % against epochs, and each `--baseline LABEL=PATH` (e.g. the random encoder) as a
horizontal line; prints the markdown table (one row per objective, one column per evaluator and
budget, +- one binomial standard error; with `--long` one row per objective and budget) and with
`--summary` writes its numbers as JSON (top-1 in %, `"unit": "percent"`; old probe files, which
hold fractions, are converted on reading).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import probe_table  # pylint: disable=g-import-not-at-top,wrong-import-position


def parse_point(spec: str) -> tuple[str, float, str]:
  """'LABEL@EPOCHS=PATH' -> (label, epochs, path)."""
  head, sep, path = spec.partition('=')
  label, at, epochs = head.rpartition('@')
  if not (sep and at and path):
    raise ValueError(f'{spec!r}: use LABEL@EPOCHS=PATH (e.g. I-JEPA@4=runs/probe17/ijepa_3124).')
  return label, float(epochs), path


def collect(points: Sequence[str]) -> dict[str, dict[float, dict]]:
  """{label: {epochs: {'top1': {column: top-1 in %}, 'n': test images}}}."""
  out: dict[str, dict[float, dict]] = {}
  for spec in points:
    label, epochs, path = parse_point(spec)
    results = probe_table.read(path)
    out.setdefault(label, {})[epochs] = {'top1': probe_table.top1s(results),
                                         'n': int(results['num_test'])}
  return out


def _columns(curves: dict[str, dict[float, dict]]) -> list[str]:
  """The `probe_table.COLUMNS` keys that at least one point of the curves has."""
  return [c for c, _ in probe_table.COLUMNS
          if any(c in p['top1'] for pts in curves.values() for p in pts.values())]


def _cell(point: dict | None, column: str) -> str:
  """'top-1 +- one binomial standard error', in %; '-' where the point lacks the evaluator."""
  if point is None or column not in point['top1']:
    return '-'
  p = point['top1'][column]
  return f'{p:.2f} +- {probe_table.binomial_se(p, point["n"]):.2f}'


def table(curves: dict[str, dict[float, dict]], baselines: dict[str, dict]) -> str:
  """Markdown: a row per objective (and baseline), a column per (evaluator, budget)."""
  columns = _columns(curves)
  budgets = sorted({e for pts in curves.values() for e in pts})
  names = dict(probe_table.COLUMNS)
  head = ['objective'] + [f'{names[c]}, {e:g} ep' for c in columns for e in budgets]
  lines = ['| ' + ' | '.join(head) + ' |', '|' + ' --- |' * len(head)]

  for label, point in baselines.items():
    lines.append('| ' + ' | '.join([label] + [_cell(point, c) for c in columns for _ in budgets])
                 + ' |')
  for label, pts in curves.items():
    lines.append('| ' + ' | '.join([label] + [_cell(pts.get(e), c) for c in columns
                                              for e in budgets]) + ' |')
  return '\n'.join(lines)


def long_table(curves: dict[str, dict[float, dict]], baselines: dict[str, dict]) -> str:
  """Markdown: a row per (objective, budget) and per baseline, a column per evaluator.

  For curves with many budgets, where `table`'s evaluator x budget columns get too wide.
  """
  columns = _columns(curves)
  names = dict(probe_table.COLUMNS)
  lines = ['| objective | epochs | ' + ' | '.join(names[c] for c in columns) + ' |',
           '|' + ' --- |' * (len(columns) + 2)]
  rows = [(label, '-', point) for label, point in baselines.items()]
  rows += [(label, f'{e:g}', pts[e]) for label, pts in curves.items() for e in sorted(pts)]
  for label, epochs, point in rows:
    lines.append('| ' + ' | '.join([label, epochs] + [_cell(point, c) for c in columns]) + ' |')
  return '\n'.join(lines)


def plot(curves: dict[str, dict[float, dict]], baselines: dict[str, dict], out: str,
         title: str = '') -> None:
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  columns = [(c, dict(probe_table.COLUMNS)[c]) for c in _columns(curves)]
  # At most 3 panels a row, and the legend beside them: with many curves it hid points.
  ncols = min(3, len(columns))
  nrows = -(-len(columns) // ncols)
  fig, axes = plt.subplots(nrows, ncols, figsize=(4.5 * ncols, 3.8 * nrows), squeeze=False)
  for ax, (column, name) in zip(axes.flat, columns):
    for label, pts in curves.items():
      xs = [e for e in sorted(pts) if column in pts[e]['top1']]
      ax.plot(xs, [pts[e]['top1'][column] for e in xs], marker='o', label=label)
    for label, point in baselines.items():
      if column in point['top1']:
        ax.axhline(point['top1'][column], color='grey', linestyle='--', label=label)
    ax.set_xlabel('pretraining epochs')
    ax.set_ylabel(f'{name} top-1 (%)')
    ax.grid(alpha=0.3)
  for ax in list(axes.flat)[len(columns):]:
    ax.set_visible(False)
  handles, labels = axes[0][0].get_legend_handles_labels()
  legend = fig.legend(handles, labels, loc='upper left', bbox_to_anchor=(1.0, 1.0), fontsize=8)
  if title:
    fig.suptitle(title)
  fig.tight_layout()
  fig.savefig(out, dpi=120, bbox_extra_artists=(legend,), bbox_inches='tight')
  plt.close(fig)


def main(argv: Sequence[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('points', nargs='+',
                      help='LABEL@EPOCHS=PATH (a probe workdir or its probe_results.json)')
  parser.add_argument('--out', required=True, help='PNG to write')
  parser.add_argument('--baseline', action='append', default=[], help='LABEL=PATH, a flat line')
  parser.add_argument('--summary', default='', help="also write the table's numbers as JSON")
  parser.add_argument('--title', default='')
  parser.add_argument('--long', action='store_true',
                      help='print a row per objective and budget (a column per evaluator)')
  args = parser.parse_args(argv)
  try:
    curves = collect(args.points)
    baselines = {}
    for spec in args.baseline:
      label, _, path = spec.partition('=')
      results = probe_table.read(path)
      baselines[label] = {'top1': probe_table.top1s(results), 'n': int(results['num_test'])}
  except ValueError as e:
    parser.error(str(e))
  plot(curves, baselines, args.out, args.title)
  print(long_table(curves, baselines) if args.long else table(curves, baselines))
  if args.summary:
    with open(args.summary, 'w', encoding='utf-8') as f:
      json.dump({'unit': probe_table.units.UNIT, 'baselines': baselines,
                 'curves': {k: {f'{e:g}': p for e, p in v.items()} for k, v in curves.items()}},
                f, indent=1, sort_keys=True)


if __name__ == '__main__':
  main()
