"""Accuracy is a percentage everywhere the project writes it (top-1 54.72, not 0.5472).

  percent(fraction)                    100 x fraction, rounded to 10 decimals (no 54.720000000001):
                                       what new files hold.
  probe_results_to_percent(results)    a probe result of fractions (what the evaluators compute)
                                       -> the same tree in percent, marked `"unit": "percent"`.
  read_probe_results(results)          any probe_results.json, old or new, in percent.
  metrics_row_to_percent(row)          one metrics.jsonl row, old or new, in percent.

The evaluators compute fractions internally (cheaper to test against numpy); the probe runner and
the trainer's in-training monitors convert once, on the way out. The rule for reading files:

* `probe_results.json` with a top-level `"unit": "percent"` holds percentages; one without that
  key (written before the change) holds fractions in [0, 1] and is converted on reading.
  Old files are read as exactly 100 x fraction (not rounded), the arithmetic the table scripts
  did before the change, so a table printed from them does not move in its last digit (100 x
  0.3035 is 30.349999..., printed 30.3, where 30.35 would print 30.4).
* a metrics.jsonl row's in-training monitor values (`knn_top1`, `knn_top5`, `fewshot_<k>shot`)
  are percentages when the row has `"unit": "percent"`, fractions otherwise. Fine-tuning's
  `eval_top1` / `eval_top5` / `best_top1` have always been percentages.
"""

from __future__ import annotations

from collections.abc import Callable
import copy
import re
from typing import Any

UNIT = 'percent'

# The accuracy entries of a probe result (each a number, a {shot: number} dict or a list).
_ACCURACY_KEYS = frozenset({'top1', 'top5', 'holdout_top1', 'top1_std', 'per_seed'})
_MONITOR_KEY = re.compile(r'^(knn_top[15]|fewshot_\d+shot)$')


def percent(fraction: float) -> float:
  """100 x `fraction`, rounded to 10 decimals: 0.5472 -> 54.72 exactly as JSON writes it."""
  return round(100.0 * float(fraction), 10)


def _exact(fraction: float) -> float:
  return 100.0 * float(fraction)


def _scale(node: Any, to: Callable[[float], float]) -> Any:
  """Every number of `node` (a number, or dicts / lists of them) in percent; None stays None."""
  if isinstance(node, dict):
    return {k: _scale(v, to) for k, v in node.items()}
  if isinstance(node, (list, tuple)):
    return [_scale(v, to) for v in node]
  if isinstance(node, bool) or node is None or isinstance(node, str):
    return node
  return to(node)


def _convert(node: Any, to: Callable[[float], float]) -> Any:
  """The accuracy entries of a probe result's tree in percent; everything else unchanged."""
  if isinstance(node, dict):
    return {k: _scale(v, to) if k in _ACCURACY_KEYS else _convert(v, to) for k, v in node.items()}
  if isinstance(node, list):
    return [_convert(v, to) for v in node]
  return node


def probe_results_to_percent(results: dict[str, Any], *, rounded: bool = True) -> dict[str, Any]:
  """A probe result in fractions -> percent, with `unit` set (a new dict; `config` untouched).

  Converts every `top1`, `top5`, `holdout_top1`, `top1_std` and `per_seed` (the linear grid's
  `sweep` entries included) and the few-shot probe's `per_features` ({kind: {shot: top-1}}).
  `rounded`: `percent` (what new files hold); else exactly 100 x fraction (reading old files).
  """
  to = percent if rounded else _exact
  out = {k: (copy.deepcopy(v) if k == 'config' else _convert(v, to)) for k, v in results.items()}
  fewshot = out.get('fewshot')
  if isinstance(fewshot, dict) and 'per_features' in fewshot:
    fewshot['per_features'] = _scale(fewshot['per_features'], to)
  out.pop('accuracy_units', None)   # Written as 'fraction' by the probes of before the change.
  out['unit'] = UNIT
  return out


def read_probe_results(results: dict[str, Any]) -> dict[str, Any]:
  """A loaded probe_results.json in percent: as it is if marked so, else converted (fractions)."""
  if results.get('unit') == UNIT:
    return results
  if results.get('unit') is not None:
    raise ValueError(f'Unknown accuracy unit {results["unit"]!r} in a probe result; '
                     f'expected {UNIT!r} (or no unit: fractions).')
  return probe_results_to_percent(results, rounded=False)


def monitor_to_percent(values: dict[str, float]) -> dict[str, Any]:
  """The in-training monitors' {'knn_top1': fraction, ...} as logged: percent, `unit` set."""
  return dict({k: percent(v) for k, v in values.items()}, unit=UNIT)


def metrics_row_to_percent(row: dict[str, Any]) -> dict[str, Any]:
  """One metrics.jsonl row with its monitor accuracies in percent (rows of old runs converted)."""
  if row.get('unit') == UNIT or not any(_MONITOR_KEY.match(k) for k in row):
    return row
  return dict({k: _exact(v) if _MONITOR_KEY.match(k) and isinstance(v, (int, float)) else v
               for k, v in row.items()}, unit=UNIT)
