"""Accuracy in percent everywhere (cjepa_jax/evals/units.py), and older files read in percent."""

import json
import pathlib

import pytest

from cjepa_jax.evals import units

REPO = pathlib.Path(__file__).resolve().parents[1]


def _fraction_probe():
  """A probe result as the evaluators compute it (fractions), every evaluator's shape."""
  return {
      'linear': {'top1': 0.5472, 'top5': 0.9401, 'best_lr': 0.3, 'best_wd': 1e-05,
                 'holdout_top1': 0.55, 'holdout_loss': 1.3187, 'retrained': True, 'dim': 768,
                 'sweep': [{'lr': 0.001, 'wd': 0.0, 'holdout_top1': 0.5022,
                            'holdout_loss': 1.386}],
                 'features': 'last4',
                 'per_features': {'last': {'top1': 0.5264, 'top5': 0.9354, 'best_lr': 1.0,
                                           'holdout_top1': 0.5278, 'holdout_loss': 1.34}}},
      'knn': {'top1': 0.4189, 'top5': 0.8836999535560608, 'k': 20, 'temperature': 0.07,
              'features': 'last4', 'per_features': {'last': {'top1': 0.4258, 'top5': 0.8862}}},
      'fewshot': {'top1': {'1': 0.14506666666666665, '10': 0.2898},
                  'top1_std': {'1': 0.019336723840632588, '10': 0.008777623064740631},
                  'per_seed': {'1': [0.1357, 0.172, 0.1275], '10': [0.2831, 0.2841, 0.3022]},
                  'shots': [1, 10], 'seeds': 3, 'l2_reg': 1024.0, 'features': 'last4',
                  'per_features': {'last': {'1': 0.15183333333333335, '10': 0.2853666666666667}}},
      'lowshot': {'fractions': {'1%': {'top1': 0.3767, 'top5': 0.8822, 'best_lr': 0.003,
                                       'holdout_top1': 0.42, 'fraction': 0.01,
                                       'num_train': 500}},
                  'features': 'last4', 'per_features': {'last': {'1%': {'top1': 0.3722,
                                                                        'top5': 0.8763}}}},
      'attentive': {'top1': 0.5333, 'top5': 0.9419, 'best_lr': 0.0005, 'best_wd': 0.01,
                    'holdout_top1': None, 'holdout_loss': None, 'epochs': 5},
      'checkpoint': '/runs/x/checkpoints/6248', 'step': 6248, 'num_train': 50000,
      'num_test': 10000, 'accuracy_units': 'fraction',
      'config': {'linear': {'holdout_fraction': 0.1, 'lrs': [0.001, 1.0]}},
  }


def test_percent_is_exact_to_ten_decimals():
  assert units.percent(0.5472) == 54.72
  assert units.percent(0.3035) == 30.35 != 100 * 0.3035   # 30.349999999999998.
  assert units.percent(0.14506666666666665) == 14.5066666667
  assert units.percent(1) == 100.0 and units.percent(0.0) == 0.0


def test_probe_results_to_percent_converts_every_accuracy_and_nothing_else():
  old = _fraction_probe()
  new = units.probe_results_to_percent(old)
  assert old == _fraction_probe()   # A new dict; the input is untouched.
  assert new['unit'] == 'percent' and 'accuracy_units' not in new
  lin = new['linear']
  assert (lin['top1'], lin['top5'], lin['holdout_top1']) == (54.72, 94.01, 55.0)
  assert (lin['best_lr'], lin['best_wd'], lin['holdout_loss'], lin['dim']) == (
      0.3, 1e-05, 1.3187, 768)
  assert lin['retrained'] is True
  assert lin['sweep'] == [{'lr': 0.001, 'wd': 0.0, 'holdout_top1': 50.22, 'holdout_loss': 1.386}]
  assert lin['per_features']['last'] == {'top1': 52.64, 'top5': 93.54, 'best_lr': 1.0,
                                         'holdout_top1': 52.78, 'holdout_loss': 1.34}
  knn = new['knn']
  assert (knn['top1'], knn['top5'], knn['k'], knn['temperature']) == (
      41.89, 88.3699953556, 20, 0.07)
  assert knn['per_features'] == {'last': {'top1': 42.58, 'top5': 88.62}}
  fs = new['fewshot']
  assert fs['top1'] == {'1': 14.5066666667, '10': 28.98}
  assert fs['top1_std'] == {'1': 1.9336723841, '10': 0.8777623065}
  assert fs['per_seed'] == {'1': [13.57, 17.2, 12.75], '10': [28.31, 28.41, 30.22]}
  assert (fs['shots'], fs['seeds'], fs['l2_reg']) == ([1, 10], 3, 1024.0)
  assert fs['per_features'] == {'last': {'1': 15.1833333333, '10': 28.5366666667}}
  low = new['lowshot']
  assert low['fractions']['1%'] == {'top1': 37.67, 'top5': 88.22, 'best_lr': 0.003,
                                    'holdout_top1': 42.0, 'fraction': 0.01, 'num_train': 500}
  assert low['per_features'] == {'last': {'1%': {'top1': 37.22, 'top5': 87.63}}}
  att = new['attentive']
  assert (att['top1'], att['top5'], att['holdout_top1'], att['epochs']) == (53.33, 94.19, None, 5)
  assert new['config'] == old['config']   # The probe's config is never scaled.
  assert (new['step'], new['num_train'], new['num_test']) == (6248, 50000, 10000)


def test_read_probe_results_converts_old_files_once():
  # Old files: exactly 100 x fraction, the arithmetic the table scripts always did, so tables
  # printed from the files in results/ keep their last digit.
  new = units.read_probe_results(_fraction_probe())
  assert new['unit'] == 'percent' and new['linear']['top1'] == 100 * 0.5472
  assert new['fewshot']['per_features']['last']['1'] == 100 * 0.15183333333333335
  old = dict(_fraction_probe(), knn={"top1": 0.3035})
  assert units.read_probe_results(old)["knn"]["top1"] == 100 * 0.3035 != 30.35
  assert units.read_probe_results(new) is new   # Marked percent: read as it is.
  with pytest.raises(ValueError, match='Unknown accuracy unit'):
    units.read_probe_results({'unit': 'per mille'})


def test_a_committed_old_probe_file_reads_in_percent():
  """results/probes/ keeps the files as written (fractions, no unit): read, they are in %."""
  raw = json.loads((REPO / 'results' / 'probes' / 'ijepa_ep8.json').read_text())
  assert 'unit' not in raw and raw['linear']['top1'] == 0.5472
  got = units.read_probe_results(raw)
  assert (got['linear']['top1'], got['knn']['top1'], got['attentive']['top1']) == (
      100 * 0.5472, 100 * 0.4189, 100 * 0.5333)
  assert f"{got['linear']['top1']:.2f}" == '54.72'   # RESULTS.md's I-JEPA, 8 epochs.
  assert got['fewshot']['top1']['10'] == 100 * 0.2898
  assert got['lowshot']['fractions']['10%']['top1'] == 100 * 0.4785


def test_metrics_rows_old_and_new():
  old = {'step': 781, 'loss': 0.3, 'knn_top1': 0.258, 'knn_top5': 0.77, 'fewshot_10shot': 0.2}
  assert units.metrics_row_to_percent(old) == {
      'step': 781, 'loss': 0.3, 'knn_top1': 100 * 0.258, 'knn_top5': 100 * 0.77,
      'fewshot_10shot': 100 * 0.2, 'unit': 'percent'}
  new = {'step': 781, 'knn_top1': 25.8, 'unit': 'percent'}
  assert units.metrics_row_to_percent(new) is new
  plain = {'step': 20, 'loss': 0.3, 'eval_top1': 41.0}   # No monitor: nothing to convert.
  assert units.metrics_row_to_percent(plain) is plain
  assert units.monitor_to_percent({'knn_top1': 0.5}) == {'knn_top1': 50.0, 'unit': 'percent'}
