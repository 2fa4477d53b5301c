r"""One table of every evaluator's test top-1 for several probe runs (RESULTS.md), and a summary.

  python experiments/cifar10/probe_table.py --summary results/cifar10_evals_summary.json \
      'random init=runs/probe/random' 'C-JEPA context=runs/probe/cjepa'

Each argument is `LABEL=PATH`, PATH a `cjepa-probe` workdir (holding its `probe_results.json`)
or a copy of that file (e.g. `results/probes17/random.json`). Prints a markdown table (top-1 in
%, with one binomial standard error of the test split: sqrt(p (100 - p) / n)) and, with --summary,
writes the numbers it printed to a JSON file (in %, `"unit": "percent"`). Evaluators a run lacks
are '-'. Probe files of every age read alike: those without `"unit": "percent"` hold fractions
and are converted on reading (`cjepa_jax.evals.units`).
"""

from __future__ import annotations

import argparse
import json
import math
import os

from cjepa_jax.evals import units

COLUMNS = (
    ('linear', 'linear'),
    ('knn', 'kNN (k 20)'),
    ('attentive', 'attentive'),
    ('fewshot10', '10-shot'),
    ('lowshot1', '1% labels'),
    ('lowshot10', '10% labels'),
)


def binomial_se(p: float, n: int) -> float:
  """One binomial standard error, in %, of an accuracy p in % over n examples."""
  return math.sqrt(p * (100.0 - p) / n)


def read(path: str) -> dict:
  """A probe's results, accuracies in %: PATH is its workdir or a copy of its probe_results.json."""
  if os.path.isdir(path):
    path = os.path.join(path, 'probe_results.json')
  if not os.path.isfile(path):
    raise ValueError(f'{path}: no probe result there; give a cjepa-probe workdir or its '
                     'probe_results.json (run cjepa-probe first).')
  with open(path, encoding='utf-8') as f:
    return units.read_probe_results(json.load(f))


def top1s(results: dict) -> dict[str, float]:
  """{column: test top-1 in %} of one probe result as `read` returns it."""
  out = {}
  for name in ('linear', 'knn', 'attentive'):
    if name in results:
      out[name] = results[name]['top1']
  if 'fewshot' in results and '10' in results['fewshot']['top1']:
    out['fewshot10'] = results['fewshot']['top1']['10']
  if 'lowshot' in results:
    for label, key in (('1%', 'lowshot1'), ('10%', 'lowshot10')):
      if label in results['lowshot']['fractions']:
        out[key] = results['lowshot']['fractions'][label]['top1']
  return out


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('runs', nargs='+',
                      help='LABEL=PATH (a probe workdir or its probe_results.json)')
  parser.add_argument('--summary', help='write the table\'s numbers as JSON here')
  args = parser.parse_args()
  rows, summary = [], {}
  for spec in args.runs:
    label, _, path = spec.partition('=')
    if not path:
      parser.error(f'{spec!r}: use LABEL=PATH.')
    try:
      results = read(path)
    except ValueError as e:
      parser.error(str(e))
    n = int(results['num_test'])
    values = top1s(results)
    cells = []
    for key, _ in COLUMNS:
      if key in values:
        p = values[key]
        cells.append(f'{p:.2f} +- {binomial_se(p, n):.2f}')
      else:
        cells.append('-')
    rows.append(f'| {label} | ' + ' | '.join(cells) + ' |')
    summary[label] = dict(values, num_test=n, checkpoint=results['checkpoint'],
                          step=results['step'], features=results.get('linear', {}).get('features'))
  print('| encoder | ' + ' | '.join(title for _, title in COLUMNS) + ' |')
  print('| --- |' + ' --- |' * len(COLUMNS))
  print('\n'.join(rows))
  if args.summary:
    with open(args.summary, 'w', encoding='utf-8') as f:
      json.dump(dict(summary, unit=units.UNIT), f, indent=2)


if __name__ == '__main__':
  main()
