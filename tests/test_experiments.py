"""experiments/cifar10/: the scripts that make RESULTS.md's tables and figures from results/.

Each is checked on a few made-up probe files or metrics rows: the table's exact cells, the summary
JSON (accuracies in percent; probe files of before the percent change, in fractions, read alike)
and that the PNG is written. The tuning run itself is 781 training steps: only its usage line is
checked here.
"""

import importlib.util
import json
import math
import pathlib
import subprocess
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
EXPERIMENTS = REPO / 'experiments' / 'cifar10'


def _load_module(name, path):
  spec = importlib.util.spec_from_file_location(name, path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def _finetune_workdir(path, top1_by_step, pretrained, n=10_000):
  path.mkdir()
  (path / 'config.json').write_text(json.dumps({'pretrained': pretrained, 'encoder': 'target'}))
  rows = [{'step': 1, 'loss': 2.3}]   # A training row: no evaluation in it.
  rows += [{'step': s, 'eval_top1': t, 'eval_top5': t + 40.0, 'eval_loss': 1.5,
            'eval_examples': n} for s, t in top1_by_step.items()]
  rows.append(dict(rows[-1], eval_top1=rows[-1]['eval_top1']))   # A resume re-logs a step.
  (path / 'metrics.jsonl').write_text(''.join(json.dumps(r) + '\n' for r in rows))
  return f'{pretrained}={path}'


def test_finetune_table_gains_and_their_standard_errors(tmp_path, monkeypatch, capsys):
  table = _load_module('finetune_table', EXPERIMENTS / 'finetune_table.py')
  base = _finetune_workdir(tmp_path / 'r', {130: 30.0, 260: 38.0}, 'random')
  other = _finetune_workdir(tmp_path / 'p', {130: 41.0, 260: 45.5}, 'pre')
  summary = tmp_path / 'summary.json'
  monkeypatch.setattr(sys, 'argv', ['t', base, other, '--summary', str(summary)])
  table.main()
  lines = capsys.readouterr().out.splitlines()
  se_base, se_pre = math.sqrt(0.38 * 0.62 / 1e4), math.sqrt(0.455 * 0.545 / 1e4)
  assert lines[0].startswith('| init | top-1 @ 130 | top-1 @ 260 (last) |')
  assert lines[2] == f'| random | 30.00 | 38.00 +- {100 * se_base:.2f} | 78.00 | 1.500 | - |'
  assert lines[3].endswith(f'| +7.50 +- {100 * math.hypot(se_base, se_pre):.2f} |')
  rows = json.loads(summary.read_text())
  assert rows[1]['top1'] == 45.5 and rows[1]['top1_by_step'] == {'130': 41.0, '260': 45.5}
  assert rows[1]['diff_se'] == pytest.approx(100 * math.hypot(se_base, se_pre))
  assert rows[0]['pretrained'] == 'random'
  # A copy of the metrics file (as in results/metrics/) gives the same table.
  monkeypatch.setattr(sys, 'argv', ['t', f'random={tmp_path / "r" / "metrics.jsonl"}',
                                    f'pre={tmp_path / "p" / "metrics.jsonl"}'])
  table.main()
  assert capsys.readouterr().out.splitlines() == lines
  # Runs of unequal length are not compared.
  short = _finetune_workdir(tmp_path / 's', {130: 41.0}, 'short')
  monkeypatch.setattr(sys, 'argv', ['t', base, short])
  with pytest.raises(SystemExit):
    table.main()


def _probe_dir(path, linear, knn, fewshot10=None, n=2000, percent=False):
  """A probe workdir; accuracies given as fractions, written as fractions (the files of before
  the percent change: no unit) or, with `percent`, in % with `"unit": "percent"` (today's)."""
  path.mkdir(parents=True)
  results = {'num_test': n, 'linear': {'top1': linear}, 'knn': {'top1': knn}}
  if fewshot10 is not None:
    results['fewshot'] = {'top1': {'1': 0.1, '10': fewshot10}}
  if percent:
    from cjepa_jax.evals import units  # pylint: disable=g-import-not-at-top
    results = units.probe_results_to_percent(results)
  (path / 'probe_results.json').write_text(json.dumps(results))
  return str(path)


def test_budget_plot_table_and_summary(tmp_path, capsys):
  budget = _load_module('budget_plot', EXPERIMENTS / 'budget_plot.py')
  out, summary = tmp_path / 'b.png', tmp_path / 's.json'
  a1_file = tmp_path / 'a1.json'  # A copy of the file (as in results/) reads as its directory.
  a1_file.write_text((pathlib.Path(_probe_dir(tmp_path / 'a1', 0.40, 0.30, 0.20)) /
                      'probe_results.json').read_text())
  budget.main([f'A@1={a1_file}',
               f'A@4={_probe_dir(tmp_path / "a4", 0.50, 0.36, 0.25, percent=True)}',
               f'B@4={_probe_dir(tmp_path / "b4", 0.45, 0.31)}',
               '--baseline', f'random={_probe_dir(tmp_path / "r", 0.375, 0.28, 0.19)}',
               '--out', str(out), '--summary', str(summary)])
  lines = capsys.readouterr().out.splitlines()
  assert lines[0] == ('| objective | linear, 1 ep | linear, 4 ep | kNN (k 20), 1 ep | '
                      'kNN (k 20), 4 ep | 10-shot, 1 ep | 10-shot, 4 ep |')
  se = lambda p: 100 * math.sqrt(p * (1 - p) / 2000)  # noqa: E731
  assert lines[2].startswith(f'| random | 37.50 +- {se(0.375):.2f} | 37.50 +- {se(0.375):.2f} |')
  assert lines[3] == (f'| A | 40.00 +- {se(0.4):.2f} | 50.00 +- {se(0.5):.2f} | '
                      f'30.00 +- {se(0.3):.2f} | 36.00 +- {se(0.36):.2f} | '
                      f'20.00 +- {se(0.2):.2f} | 25.00 +- {se(0.25):.2f} |')
  assert lines[4] == (f'| B | - | 45.00 +- {se(0.45):.2f} | - | 31.00 +- {se(0.31):.2f} | - | - |')
  assert out.stat().st_size > 1000
  import matplotlib.image  # pylint: disable=g-import-not-at-top
  height, width = matplotlib.image.imread(out).shape[:2]
  assert width > 2 * height  # Three evaluators: one row of panels, the legend beside them.
  data = json.loads(summary.read_text())
  # Old (fraction) and new (percent) probe files side by side: one unit, percent.
  assert data['unit'] == 'percent'
  assert data['curves']['A']['4']['top1'] == {'linear': 50.0, 'knn': 36.0, 'fewshot10': 25.0}
  assert data['curves']['A']['1']['top1'] == {'linear': 40.0, 'knn': 30.0, 'fewshot10': 20.0}
  with pytest.raises(SystemExit):  # A point without its budget: one usage line.
    budget.main([f'A={tmp_path / "a1"}', '--out', str(out)])
  budget.main([f'A@1={a1_file}', f'A@4={tmp_path / "a4"}', '--baseline', f'random={tmp_path / "r"}',
               '--out', str(out), '--long'])  # A row per budget: for curves with many budgets.
  lines = capsys.readouterr().out.splitlines()
  # Four evaluators: two rows of at most three panels.
  curves = {'A': {4.0: {'top1': {'linear': 50.0, 'knn': 40.0, 'attentive': 50.0,
                                 'fewshot10': 20.0}, 'n': 100}}}
  budget.plot(curves, {}, str(out))
  height, width = matplotlib.image.imread(out).shape[:2]
  assert height > 0.4 * width
  assert lines[0] == '| objective | epochs | linear | kNN (k 20) | 10-shot |'
  assert lines[2].startswith(f'| random | - | 37.50 +- {se(0.375):.2f} |')
  assert lines[3:] == [
      f'| A | 1 | 40.00 +- {se(0.4):.2f} | 30.00 +- {se(0.3):.2f} | 20.00 +- {se(0.2):.2f} |',
      f'| A | 4 | 50.00 +- {se(0.5):.2f} | 36.00 +- {se(0.36):.2f} | 25.00 +- {se(0.25):.2f} |']


def _tuning_probe(path, holdout, linear, knn, num_train=10_000, fraction=0.1, holdout_n=None):
  results = {'num_test': 2000, 'num_train': num_train, 'config': {'linear': {
      'holdout_fraction': fraction}}, 'linear': {'top1': linear, 'holdout_top1': holdout},
             'knn': {'top1': knn}}
  if holdout_n is not None:  # Probes record it since 2026-12-03; older files derive it.
    results['linear']['holdout_n'] = holdout_n
  path.write_text(json.dumps(results))
  return str(path)


def test_tuning_plot_compares_each_run_with_its_objectives_reference(tmp_path, capsys):
  tuning = _load_module('tuning_plot', EXPERIMENTS / 'tuning_plot.py')
  out, summary = tmp_path / 't.png', tmp_path / 's.json'
  runs = [f'A|recipe={_tuning_probe(tmp_path / "a.json", 0.468, 0.465, 0.343)}',
          f'A|lr 5e-4={_tuning_probe(tmp_path / "a2.json", 0.483, 0.466, 0.348)}',
          f'B|recipe={_tuning_probe(tmp_path / "b.json", 0.404, 0.40, 0.25, num_train=4000)}',
          f'B|w 0.01={_tuning_probe(tmp_path / "b2.json", 0.405, 0.41, 0.27)}',
          f'B|Kc 22={_tuning_probe(tmp_path / "b3.json", 0.42, 0.41, 0.27, holdout_n=250)}']
  tuning.main(runs + ['--out', str(out), '--summary', str(summary)])
  lines = capsys.readouterr().out.splitlines()
  se = lambda p, n: math.sqrt(p * (1 - p) / n)  # noqa: E731
  # A's difference: 1.5 points against sqrt(se_a^2 + se_a2^2) on 1,000 held-out images each.
  d_se = math.hypot(se(0.468, 1000), se(0.483, 1000))
  assert lines[0].startswith('| objective | change | train holdout top-1 | vs reference (in SEs) |')
  assert lines[2] == f'| A | recipe | 46.8 +- {100 * se(0.468, 1000):.1f} | reference | 46.5 | 34.3 | - |'
  assert lines[3] == (f'|  | lr 5e-4 | 48.3 +- {100 * se(0.483, 1000):.1f} | '
                      f'+1.5 +- {100 * d_se:.1f} ({0.015 / d_se:+.1f}) | 46.6 | 34.8 | - |')
  # B's reference holds out 400 of 4,000 images: its own, larger standard error.
  b_se = math.hypot(se(0.404, 400), se(0.405, 1000))
  assert lines[5].startswith(f'|  | w 0.01 | 40.5 +- 1.6 | +0.1 +- {100 * b_se:.1f} (+0.0) |')
  data = json.loads(summary.read_text())
  assert data['B'][0]['holdout_n'] == 400 and data['B'][1]['holdout_n'] == 1000
  # A recorded holdout_n wins over the count derived from the fraction (1,000 here).
  assert data['B'][2]['holdout_n'] == 250
  assert data['B'][2]['holdout_se'] == pytest.approx(100 * se(0.42, 250))   # In %.
  assert data['A'][1]['diff_se'] == pytest.approx(100 * d_se)
  assert data['unit'] == 'percent' and data['A'][1]['holdout_top1'] == 48.3
  assert data['A'][1]['test_top1'] == {'linear': 46.6, 'knn': 34.8}
  assert out.stat().st_size > 1000
  with pytest.raises(SystemExit):  # A run without its objective: one usage line.
    tuning.main([f'recipe={tmp_path / "a.json"}', '--out', str(out)])
  (tmp_path / 'nohold.json').write_text(json.dumps({'num_test': 10, 'knn': {'top1': 0.3}}))
  with pytest.raises(SystemExit):  # A probe without the linear holdout names the fix.
    tuning.main([f'A|x={tmp_path / "nohold.json"}', '--out', str(out)])
  assert 'linear.holdout_fraction > 0' in capsys.readouterr().err
  with pytest.raises(SystemExit):  # A probe file that is not there: named, no traceback.
    tuning.main([f'A|x={tmp_path / "missing.json"}', '--out', str(out)])
  assert 'missing.json: no probe result there' in capsys.readouterr().err


def test_tuning_run_script_names_its_arguments():
  # The full run is 781 training steps (RESULTS.md); here only its usage line is checked.
  script = EXPERIMENTS / 'tuning_run.sh'
  done = subprocess.run(['bash', str(script), 'runs/x'], capture_output=True, text=True,
                        check=False)
  assert done.returncode == 2 and 'usage:' in done.stderr and 'OBJECTIVE' in done.stderr
