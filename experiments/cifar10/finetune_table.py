r"""One table of fine-tuning runs (RESULTS.md): eval top-1 along the run, and each run's gain.

  python experiments/cifar10/finetune_table.py --summary results/cifar10_finetune_summary.json \
      'random init=runs/ft/random' 'I-JEPA=runs/ft/ijepa' 'C-JEPA context=runs/ft/cjepa'

Each argument is `LABEL=PATH`, PATH a `cjepa-finetune` workdir (its `metrics.jsonl` and
`config.json`) or a copy of its metrics.jsonl (as in `results/metrics/`; the summary then has no
`pretrained` / `encoder`). The first run is the baseline. Prints a markdown table: the eval top-1 (%) at
every evaluation, the last one with one binomial standard error (sqrt(p (1 - p) / n), n the eval
examples), the last top-5 and eval loss, and the difference of the last top-1 from the baseline's
with its standard error sqrt(se_a^2 + se_b^2). That treats the two scores as independent; they
are on the same images, and the positive correlation of paired scores makes the true standard
error of the difference smaller, so this one is conservative. Neither says anything about
seed-to-seed variation of training, which one run per row cannot measure. With --summary it writes
the numbers it printed to a JSON file.
"""

from __future__ import annotations

import argparse
import json
import math
import os


def read_evals(path: str) -> list[dict]:
  """The evaluation rows of DIR/metrics.jsonl, by step (a resumed run's re-logged step: last)."""
  rows = {}
  metrics = path if os.path.isfile(path) else os.path.join(path, 'metrics.jsonl')
  with open(metrics, encoding='utf-8') as f:
    for line in f:
      row = json.loads(line)
      if 'eval_top1' in row:
        rows[row['step']] = row
  if not rows:
    raise SystemExit(f'{metrics} has no evaluation (eval_top1) rows.')
  return [rows[s] for s in sorted(rows)]


def binomial_se(top1_percent: float, n: int) -> float:
  """One standard error (in points) of an accuracy in %, over n independent examples."""
  p = top1_percent / 100.0
  return 100.0 * math.sqrt(p * (1.0 - p) / n)


def summarise(label: str, path: str) -> dict:
  evals = read_evals(path)
  last = evals[-1]
  n = int(last['eval_examples'])
  config = {}
  if os.path.isdir(path):
    with open(os.path.join(path, 'config.json'), encoding='utf-8') as f:
      config = json.load(f)
  return dict(label=label, workdir=path, pretrained=config.get('pretrained'),
              encoder=config.get('encoder'), steps=last['step'], eval_examples=n,
              top1_by_step={str(r['step']): r['eval_top1'] for r in evals},
              top1=last['eval_top1'], top1_se=binomial_se(last['eval_top1'], n),
              top5=last['eval_top5'], eval_loss=last['eval_loss'])


def table(runs: list[dict]) -> str:
  steps = sorted({int(s) for r in runs for s in r['top1_by_step']})
  base = runs[0]
  head = (['init'] + [f'top-1 @ {s}' for s in steps[:-1]] + [f'top-1 @ {steps[-1]} (last)',
          'top-5 (last)', 'eval loss (last)', f'vs {base["label"]}'])
  lines = ['| ' + ' | '.join(head) + ' |', '| --- |' + ' --- |' * (len(head) - 1)]
  for r in runs:
    cells = [r['label']]
    cells += [f"{r['top1_by_step'][str(s)]:.2f}" if str(s) in r['top1_by_step'] else '-'
              for s in steps[:-1]]
    cells.append(f"{r['top1']:.2f} +- {r['top1_se']:.2f}")
    cells += [f"{r['top5']:.2f}", f"{r['eval_loss']:.3f}"]
    if r is base:
      cells.append('-')
    else:
      cells.append(f"{r['top1'] - base['top1']:+.2f} +- {r['diff_se']:.2f}")
    lines.append('| ' + ' | '.join(cells) + ' |')
  return '\n'.join(lines)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('runs', nargs='+', help='LABEL=PATH (a fine-tuning workdir or its metrics.jsonl); first: baseline')
  parser.add_argument('--summary', help="write the table's numbers as JSON here")
  args = parser.parse_args()
  runs = []
  for spec in args.runs:
    label, _, path = spec.partition('=')
    if not path:
      parser.error(f'{spec!r}: use LABEL=PATH.')
    runs.append(summarise(label, path))
  base = runs[0]
  for r in runs:
    if r['steps'] != base['steps']:
      parser.error(f"{r['label']} ran {r['steps']} steps, {base['label']} {base['steps']}: "
                   'compare runs of equal length.')
    r['diff_se'] = math.hypot(r['top1_se'], base['top1_se'])
  print(table(runs))
  if args.summary:
    with open(args.summary, 'w', encoding='utf-8') as f:
      json.dump(runs, f, indent=2)


if __name__ == '__main__':
  main()
