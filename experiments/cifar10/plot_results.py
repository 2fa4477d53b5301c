r"""Plots pretraining curves of several runs: loss and in-training kNN top-1 against the step.

  python experiments/cifar10/plot_results.py --out results/cifar10_curves.png \
      I-JEPA=runs/cifar10_ijepa C-JEPA-context=runs/cifar10_cjepa C-JEPA-blocks=runs/cifar10_blocks

Each positional argument is `label=path`, where path is a pretraining workdir (its
`metrics.jsonl` is read) or a metrics.jsonl file. Writes one PNG with two panels: `loss` (the whole
objective; for C-JEPA that includes the weighted VICReg term, so `--jepa_only` plots the JEPA term
`jepa` instead, which is comparable across methods) and `knn_top1` (as a percentage) against
`step`, for the log steps that have them. `--random_knn` draws a horizontal line at the kNN top-1
(in %) of a randomly initialised encoder.

`--summary OUT.json` also writes the final numbers of every run: the last step, final loss and
in-training kNN top-1, the summed train-step time, and the probe results found in
`<workdir>/probe/probe_results.json` (linear and kNN top-1 / top-5); `--baseline label=DIR` adds
a probe-only row (e.g. the random encoder's probe workdir). Every accuracy is in % (`"unit":
"percent"`); metrics rows and probe files written before the change hold fractions and are
converted on reading (`cjepa_jax.evals.units`).

A run that was resumed can log a step twice; the last record of each step wins.
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Sequence

import matplotlib

from cjepa_jax.evals import units

matplotlib.use('Agg')
import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top


def parse_run(arg: str) -> tuple[str, str]:
  """'label=path' -> (label, path to metrics.jsonl)."""
  if '=' not in arg:
    raise ValueError(f'Runs are given as label=path (e.g. I-JEPA=runs/cifar10_ijepa), got {arg!r}.')
  label, path = arg.split('=', 1)
  if os.path.isdir(path):
    path = os.path.join(path, 'metrics.jsonl')
  if not os.path.isfile(path):
    raise ValueError(f'{path} does not exist: pass a pretraining workdir or its metrics.jsonl.')
  return label, path


def read_metrics(path: str) -> list[dict]:
  """The records of a metrics.jsonl, one per logged step, sorted by step (last record wins).

  The in-training monitors' accuracies (`knn_top1`, ...) in %, whatever the file's age.
  """
  by_step = {}
  with open(path) as f:
    for line in f:
      line = line.strip()
      if line:
        rec = units.metrics_row_to_percent(json.loads(line))
        by_step[int(rec['step'])] = rec
  return [by_step[s] for s in sorted(by_step)]


def series(records: Sequence[dict], key: str, scale: float = 1.0
           ) -> tuple[list[int], list[float]]:
  """(steps, values) of the records that have `key`."""
  pts = [(r['step'], r[key] * scale) for r in records if r.get(key) is not None]
  return [p[0] for p in pts], [p[1] for p in pts]


def plot(runs: Sequence[tuple[str, str]], out: str, jepa_only: bool = False,
         random_knn: float | None = None, title: str = '') -> None:
  """Writes the two-panel PNG of `runs` ([(label, metrics.jsonl path)]) to `out`."""
  fig, (ax_loss, ax_knn) = plt.subplots(1, 2, figsize=(11, 4.2))
  loss_key = 'jepa' if jepa_only else 'loss'
  for label, path in runs:
    records = read_metrics(path)
    line, = ax_loss.plot(*series(records, loss_key), label=label)
    steps, knn = series(records, 'knn_top1')
    ax_knn.plot(steps, knn, marker='o', color=line.get_color(), label=label)
  if random_knn is not None:
    ax_knn.axhline(random_knn, color='gray', linestyle='--', label='random encoder')
  ax_loss.set_xlabel('step')
  ax_loss.set_ylabel('JEPA loss' if jepa_only else 'training loss')
  ax_loss.set_title('JEPA loss term' if jepa_only else 'training loss (whole objective)')
  ax_knn.set_xlabel('step')
  ax_knn.set_ylabel('kNN top-1 (%)')
  ax_knn.set_title('in-training kNN top-1 (target encoder)')
  for ax in (ax_loss, ax_knn):
    ax.grid(alpha=0.3)
    ax.legend()
  if title:
    fig.suptitle(title)
  fig.tight_layout()
  os.makedirs(os.path.dirname(out) or '.', exist_ok=True)
  fig.savefig(out, dpi=100)
  plt.close(fig)


def _probe_numbers(probe_dir: str) -> dict | None:
  """Linear / kNN top-1 and top-5 (in %) of DIR/probe_results.json, or None if absent."""
  path = os.path.join(probe_dir, 'probe_results.json')
  if not os.path.isfile(path):
    return None
  with open(path) as f:
    r = units.read_probe_results(json.load(f))
  return dict(linear_top1=r['linear']['top1'], linear_top5=r['linear']['top5'],
              linear_features=r['linear']['features'], knn_top1=r['knn']['top1'],
              knn_top5=r['knn']['top5'], num_train=r['num_train'], num_test=r['num_test'],
              checkpoint=r['checkpoint'], model=r['model'])


def summarize(runs: Sequence[tuple[str, str]], baselines: Sequence[tuple[str, str]]) -> dict:
  """{label: final numbers} of the pretraining runs and the probe-only baselines."""
  out = {}
  for label, path in runs:
    records = read_metrics(path)
    last = records[-1]
    steps, knn = series(records, 'knn_top1')
    prev, train_time = 0, 0.0
    for r in records:  # step_time_s is the window's mean; the compile is not part of it.
      if r.get('step_time_s') is not None and r['step_time_s'] == r['step_time_s']:
        train_time += r['step_time_s'] * (r['step'] - prev)
      prev = r['step']
    out[label] = dict(steps=last['step'], final_loss=last.get('loss'),
                      final_jepa=last.get('jepa'),
                      knn_monitor=dict(zip(steps, knn)),
                      train_step_time_s=round(train_time, 1),
                      probe=_probe_numbers(os.path.join(os.path.dirname(path), 'probe')))
  for label, probe_dir in baselines:
    out[label] = dict(probe=_probe_numbers(probe_dir))
  return out


def main(argv: Sequence[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('runs', nargs='+', help='label=workdir (or label=metrics.jsonl)')
  parser.add_argument('--out', required=True, help='PNG to write')
  parser.add_argument('--jepa_only', action='store_true',
                      help='plot the JEPA term instead of the whole objective')
  parser.add_argument('--random_knn', type=float, default=None,
                      help='kNN top-1 (in %) of a random encoder, drawn as a line')
  parser.add_argument('--title', default='')
  parser.add_argument('--summary', default='', help='also write the final numbers to this JSON')
  parser.add_argument('--baseline', action='append', default=[],
                      help='label=probe_dir: a probe-only row for --summary (repeatable)')
  args = parser.parse_args(argv)
  try:
    runs = [parse_run(a) for a in args.runs]
  except ValueError as e:
    parser.error(str(e))
  baselines = []
  for b in args.baseline:
    if '=' not in b:
      parser.error(f'--baseline takes label=probe_dir, got {b!r}.')
    baselines.append(tuple(b.split('=', 1)))
  plot(runs, args.out, jepa_only=args.jepa_only, random_knn=args.random_knn, title=args.title)
  print(f'wrote {args.out}')
  if args.summary:
    with open(args.summary, 'w') as f:
      json.dump(dict(summarize(runs, baselines), unit=units.UNIT), f, indent=2)
    print(f'wrote {args.summary}')


if __name__ == '__main__':
  main()
