r"""Each objective's tuning runs against its recipe, on the linear probe's train holdout.

  python experiments/cifar10/tuning_plot.py --out results/cifar10_tuning.png \
      --summary results/cifar10_tuning_summary.json \
      'C-JEPA context|recipe=results/probes17/cjepa_781.json' \
      'C-JEPA context|lr 5e-4=results/probes17/cjepa_lr5e-4_781.json' ...

Each argument is `OBJECTIVE|CHANGE=PATH`, PATH a `cjepa-probe` workdir or a copy of its
`probe_results.json`. The first argument of an objective is its reference (the recipe's checkpoint
at the same step); every later run of that objective is compared with it. The comparison reads the
number the tuning chose on: the linear probe's top-1 on its held-out part of the TRAIN split
(the probe's recorded `holdout_n` images; in older probe files, which lack it,
`linear.holdout_fraction` of `num_train`), with one binomial standard error, and the
difference from the reference with the standard error of a difference of two independent
estimates, sqrt(se_a^2 + se_b^2). The test-split columns (linear, kNN, 10-shot) are printed beside
it for the record; they choose nothing. Prints a markdown table, writes a PNG (a row per run,
grouped by objective, the reference dashed) and with `--summary` the table's numbers as JSON
(accuracies in %, `"unit": "percent"`; old probe files, in fractions, are converted on reading).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from collections.abc import Sequence

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import probe_table  # pylint: disable=g-import-not-at-top,wrong-import-position

TEST_COLUMNS = ('linear', 'knn', 'fewshot10')


def parse_run(spec: str) -> tuple[str, str, str]:
  """'OBJECTIVE|CHANGE=PATH' -> (objective, change, path)."""
  head, sep, path = spec.partition('=')
  objective, bar, change = head.partition('|')
  if not (sep and bar and objective and change and path):
    raise ValueError(f'{spec!r}: use OBJECTIVE|CHANGE=PATH '
                     '(e.g. "C-JEPA context|lr 5e-4=results/probes17/cjepa_lr5e-4_781.json").')
  return objective, change, path


def holdout(results: dict, path: str) -> tuple[float, int]:
  """(linear top-1 on the train holdout in %, number of held-out images) of one probe."""
  linear = results.get('linear', {})
  fraction = results.get('config', {}).get('linear', {}).get('holdout_fraction')
  if linear.get('holdout_top1') is None or not fraction or 'num_train' not in results:
    raise ValueError(f'{path}: no linear-probe holdout in this probe result; rerun cjepa-probe '
                     'with the linear evaluator and linear.holdout_fraction > 0.')
  if 'holdout_n' in linear:
    return float(linear['holdout_top1']), int(linear['holdout_n'])
  # Probe files written before the probe recorded holdout_n: evals/linear.holdout_split's count.
  return float(linear['holdout_top1']), int(round(fraction * results['num_train']))


def collect(specs: Sequence[str]) -> dict[str, list[dict]]:
  """{objective: [run, ...]}, the reference first; each run's accuracies in %."""
  groups: dict[str, list[dict]] = {}
  for spec in specs:
    objective, change, path = parse_run(spec)
    results = probe_table.read(path)
    p, n = holdout(results, path)
    groups.setdefault(objective, []).append(dict(
        change=change, holdout_top1=p, holdout_n=n, holdout_se=probe_table.binomial_se(p, n),
        test_top1=probe_table.top1s(results), num_test=int(results['num_test'])))
  for runs in groups.values():
    ref = runs[0]
    for run in runs:
      run['diff'] = run['holdout_top1'] - ref['holdout_top1']
      run['diff_se'] = math.hypot(run['holdout_se'], ref['holdout_se']) if run is not ref else 0.0
  return groups


def table(groups: dict[str, list[dict]]) -> str:
  """Markdown: a row per run; holdout top-1, its difference from the reference, test top-1s."""
  names = dict(probe_table.COLUMNS)
  head = ['objective', 'change', 'train holdout top-1', 'vs reference (in SEs)'] + [
      f'test {names[c]}' for c in TEST_COLUMNS]
  lines = ['| ' + ' | '.join(head) + ' |', '|' + ' --- |' * len(head)]
  for objective, runs in groups.items():
    for i, run in enumerate(runs):
      hold = f'{run["holdout_top1"]:.1f} +- {run["holdout_se"]:.1f}'
      if i == 0:
        diff = 'reference'
      else:
        z = run['diff'] / run['diff_se']
        diff = f'{run["diff"]:+.1f} +- {run["diff_se"]:.1f} ({z:+.1f})'
      tests = [f'{run["test_top1"][c]:.1f}' if c in run['test_top1'] else '-'
               for c in TEST_COLUMNS]
      lines.append('| ' + ' | '.join([objective if i == 0 else '', run['change'], hold, diff]
                                     + tests) + ' |')
  return '\n'.join(lines)


def plot(groups: dict[str, list[dict]], out: str, title: str | None = None) -> None:
  """A row per run (top to bottom in argument order), holdout top-1 +- one SE; references dashed."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  rows = sum(len(runs) for runs in groups.values()) + len(groups) - 1
  fig, ax = plt.subplots(figsize=(8, 0.32 * rows + 1.2))
  y, ticks, labels = 0, [], []
  for g, (objective, runs) in enumerate(groups.items()):
    color = f'C{g % 10}'
    top = y
    for i, run in enumerate(runs):
      ax.errorbar(run['holdout_top1'], -y, xerr=run['holdout_se'], fmt='o' if i else 's',
                  color=color, capsize=3)
      ticks.append(-y)
      labels.append(f'{objective}: {run["change"]}')
      y += 1
    ax.plot([runs[0]['holdout_top1']] * 2, [-top + 0.4, -(y - 1) - 0.4], '--', color=color,
            lw=1)
    y += 1  # A blank row between objectives.
  ax.set_yticks(ticks, labels, fontsize=8)
  ax.set_xlabel('linear probe top-1 on the train holdout (%), +- 1 SE')
  ax.grid(axis='x', alpha=0.3)
  if title:
    ax.set_title(title, fontsize=9)
  fig.tight_layout()
  fig.savefig(out, dpi=130)
  plt.close(fig)


def main(argv: Sequence[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('runs', nargs='+', help='OBJECTIVE|CHANGE=PATH; an objective\'s first run '
                      'is its reference')
  parser.add_argument('--out', required=True, help='the PNG to write')
  parser.add_argument('--summary', help='write the table\'s numbers as JSON here')
  parser.add_argument('--title')
  args = parser.parse_args(argv)
  try:
    groups = collect(args.runs)
  except ValueError as e:
    parser.error(str(e))
  print(table(groups))
  plot(groups, args.out, args.title)
  if args.summary:
    with open(args.summary, 'w', encoding='utf-8') as f:
      json.dump(dict(groups, unit=probe_table.units.UNIT), f, indent=2)


if __name__ == '__main__':
  main()
