"""One probe run of a frozen encoder: what `cjepa-probe` does (cjepa_jax/probe.py, the protocol).

  run(config, workdir)      checks, restore, features (once), every evaluator of `config.evals`,
                            the table, and `workdir/probe_results.json` (every accuracy in
                            percent, marked `"unit": "percent"`: evals/units.py).
  check_config(config)      ValueError naming the key for a bad probe config.
  evaluator_names(config)   the evaluators `config.evals` lists (unknown names: ValueError).

Order matters for the user: the config and the label splits are checked before anything is
restored or extracted (mismatched class folders would give silently wrong accuracies), and the
features are extracted once, into the `FeatureCache` every evaluator reads.
"""

from __future__ import annotations

import json
import os
from typing import Any

from absl import logging
import jax
import ml_collections

from cjepa_jax import distributed
from cjepa_jax import sharding
from cjepa_jax.evals import features as features_lib
from cjepa_jax.evals import registry
from cjepa_jax.evals import units

RESULTS_FILE = 'probe_results.json'


def evaluator_names(config: ml_collections.ConfigDict) -> tuple[str, ...]:
  """The evaluators `config.evals` lists ('linear,knn,...'), in order, each once."""
  listed = [n.strip() for n in str(config.get('evals', 'linear,knn')).split(',') if n.strip()]
  if not listed:
    raise ValueError(f'config.evals is empty: list evaluators from {", ".join(registry.names())}.')
  unknown = [n for n in listed if n not in registry.names()]
  if unknown:
    raise ValueError(f'Unknown evaluator(s) {", ".join(map(repr, unknown))} in config.evals; '
                     f'known: {", ".join(registry.names())}.')
  return tuple(dict.fromkeys(listed))


def check_config(config: ml_collections.ConfigDict) -> None:
  """ValueError naming the key and its valid values for a bad probe config."""
  if not config.pretrained:
    raise ValueError('Set --config.pretrained to a pretraining workdir, a checkpoint step '
                     'directory (DIR/checkpoints/<step>) or `random` (the baseline).')
  names = evaluator_names(config)
  if config.encoder not in features_lib.ENCODER_KEYS:
    raise ValueError(f'config.encoder={config.encoder!r}: use one of '
                     f'{sorted(features_lib.ENCODER_KEYS)}.')
  if config.features not in features_lib.FEATURE_CHOICES:
    raise ValueError(f'config.features={config.features!r}: use one of '
                     f'{features_lib.FEATURE_CHOICES}.')
  if config.knn.k < 1 or config.knn.temperature <= 0:
    raise ValueError(f'config.knn.k={config.knn.k} must be >= 1 and config.knn.temperature='
                     f'{config.knn.temperature} > 0.')
  if config.train_examples < 0 or config.eval_examples < 0:
    raise ValueError('config.train_examples / eval_examples must be >= 0 (0 = the whole split).')
  if not 0 <= config.linear.holdout_fraction < 1:
    raise ValueError(f'config.linear.holdout_fraction={config.linear.holdout_fraction} must be '
                     'in [0, 1).')
  if 'fewshot' in names:
    fs = config.fewshot
    if not fs.shots or min(fs.shots) < 1 or fs.seeds < 1 or not fs.l2_reg > 0:
      raise ValueError(f'config.fewshot: shots must be >= 1 (got {tuple(fs.shots)}), seeds >= 1 '
                       f'(got {fs.seeds}) and l2_reg > 0 (got {fs.l2_reg}).')
  if 'lowshot' in names:
    if not config.lowshot.fractions or not all(0 < f <= 1 for f in config.lowshot.fractions):
      raise ValueError(f'config.lowshot.fractions={tuple(config.lowshot.fractions)} must each be '
                       'in (0, 1], e.g. (0.01, 0.1).')
  if 'attentive' in names:
    att = config.attentive
    if att.epochs < 1 or att.batch_size < 1 or not 0 <= att.holdout_fraction < 1:
      raise ValueError(f'config.attentive: epochs ({att.epochs}) and batch_size '
                       f'({att.batch_size}) must be >= 1 and holdout_fraction '
                       f'({att.holdout_fraction}) in [0, 1).')


def _row(name: str, kind: str, top1: float, top5: float | None, extra: str = '') -> str:
  top5_text = f'{top5:>8.2f}' if top5 is not None else f'{"":>8}'
  return f'{name:<24}{kind:<10}{top1:>8.2f}{top5_text}{extra}'


def _format_table(results: dict[str, Any]) -> str:
  lines = [f'{"probe":<24}{"features":<10}{"top1":>8}{"top5":>8}']
  if 'linear' in results:
    lin = results['linear']
    for kind, r in lin['per_features'].items():
      mark = '*' if kind == lin['features'] else ' '
      lines.append(_row('linear ' + mark, kind, r['top1'], r['top5'],
                        f'   lr={r["best_lr"]:g} wd={r["best_wd"]:g}'
                        + (f' holdout={r["holdout_top1"]:.2f}'
                           if r['holdout_top1'] is not None else '')))
  if 'knn' in results:
    knn = results['knn']
    for kind, r in knn['per_features'].items():
      mark = '*' if kind == knn['features'] else ' '
      lines.append(_row(f'knn k={knn["k"]} T={knn["temperature"]:g} {mark}', kind, r['top1'],
                        r['top5']))
  if 'fewshot' in results:
    fs = results['fewshot']
    for k, top1 in fs['top1'].items():
      lines.append(_row(f'fewshot {k}-shot', fs['features'], top1, None,
                        f'   +-{fs["top1_std"][k]:.2f} over {fs["seeds"]} seeds, '
                        f'l2={fs["l2_reg"]:g}'))
  if 'lowshot' in results:
    low = results['lowshot']
    for label, r in low['fractions'].items():
      lines.append(_row(f'lowshot {label} labels', low['features'], r['top1'], r['top5'],
                        f'   {r["num_train"]} examples, lr={r["best_lr"]:g} wd={r["best_wd"]:g}'))
  if 'attentive' in results:
    r = results['attentive']
    lines.append(_row('attentive', 'tokens', r['top1'], r['top5'],
                      f'   lr={r["best_lr"]:g} wd={r["best_wd"]:g} epochs={r["epochs"]}'
                      + (f' holdout={r["holdout_top1"]:.2f}'
                         if r['holdout_top1'] is not None else '')))
  head = (f'{results["checkpoint"]} (step {results["step"]}, {results["model"]["variant"]}, '
          f'{results["dataset"]}, {results["num_train"]} train / {results["num_test"]} test): '
          'top-1 / top-5 in %; * = reported (chosen on the held-out train split)')
  return '\n'.join([head] + lines)


def _assemble(name: str, out: dict[str, Any], chosen: str, config: ml_collections.ConfigDict
              ) -> dict[str, Any]:
  """One evaluator's entry of probe_results.json: the chosen feature kind's result, and each."""
  if name == 'linear':
    return dict(out[chosen], features=chosen,
                per_features={kd: {k: v for k, v in r.items() if k != 'sweep'}
                              for kd, r in out.items()})
  if name == 'knn':
    return dict(top1=out[chosen]['top1'], top5=out[chosen]['top5'], k=int(config.knn.k),
                temperature=float(config.knn.temperature), features=chosen,
                per_features={kd: dict(top1=r['top1'], top5=r['top5']) for kd, r in out.items()})
  if name == 'fewshot':
    return dict(out[chosen], features=chosen,
                per_features={kd: r['top1'] for kd, r in out.items()})
  if name == 'lowshot':
    return dict(fractions=out[chosen], features=chosen,
                per_features={kd: {f: dict(top1=r['top1'], top5=r['top5'])
                                   for f, r in fr.items()} for kd, fr in out.items()})
  return out[features_lib.TOKENS]   # attentive


def _write(workdir: str, results: dict[str, Any]) -> None:
  """probe_results.json (main process only), replaced atomically."""
  if not distributed.is_main_process():
    return
  os.makedirs(workdir, exist_ok=True)
  path = os.path.join(workdir, RESULTS_FILE)
  with open(path + '.tmp', 'w', encoding='utf-8') as f:
    json.dump(results, f, indent=2)
  os.replace(path + '.tmp', path)


def run(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Restores the encoder, extracts features once, runs `config.evals`; writes the JSON.

  Returns the results dict that `workdir/probe_results.json` holds (accuracies in percent):
  one entry per evaluator, the checkpoint path and step, and the resolved config. The file is
  rewritten after every evaluator (`complete` says whether all have run), the linear probe first.
  Call on every process; only the main process writes and prints.
  """
  from cjepa_jax.data import input_pipeline  # pylint: disable=g-import-not-at-top  (TF: host only)

  check_config(config)
  names = evaluator_names(config)
  # Before restoring or extracting anything: mismatched class folders would give silently wrong
  # accuracies, and a listing is all it takes to find out.
  input_pipeline.check_label_splits(config)
  mesh = sharding.make_mesh(config)
  sharding.check_batch_divisible(config.batch_size, mesh, jax.process_count())
  encoder, params, info = features_lib.restore_encoder(config, mesh)
  data_config = config.copy_and_resolve_references()
  data_config.data.image_size = info['image_size']  # The resolution the encoder was trained at.
  if info['image_size'] != config.data.image_size:
    logging.info('Using the checkpoint\'s image size %d (the probe config says %d).',
                 info['image_size'], config.data.image_size)
  kinds = features_lib.feature_kinds(config.features)
  features = features_lib.FeatureCache.from_config(data_config, mesh, encoder)
  evaluators = {name: registry.build(name, config, mesh, encoder, features=features)
                for name in names}
  # Extracted here, once, for every evaluator: the union of the kinds they read.
  union = tuple(k for k in features_lib.ALL_KINDS
                if k in kinds or any(k in ev.kinds for ev in evaluators.values()))
  _, train_y = features.get(params, config.data.train_split, union)
  _, test_y = features.get(params, config.data.eval_split, union)
  logging.info('Features %s: %d train / %d test examples.', union, len(train_y), len(test_y))

  meta = {
      'evals': list(names),
      'checkpoint': info['checkpoint'],
      'step': info['step'],
      'encoder': info['encoder'],
      'model': info['model'],
      'image_size': info['image_size'],
      'dataset': config.data.dataset,
      'train_split': config.data.train_split,
      'eval_split': config.data.eval_split,
      'num_train': int(len(train_y)),
      'num_test': int(len(test_y)),
      'config': json.loads(config.to_json_best_effort()),
  }
  # The linear probe first: its held-out choice of feature kind is what the others report.
  order = sorted(names, key=lambda n: n != 'linear')
  chosen, results = kinds[0], {}
  for name in order:
    logging.info('Evaluator %s ...', name)
    out = evaluators[name].evaluate(params)
    if name == 'linear':
      # 'both': the better kind on the held-out train rows (ties: 'last'), never on the test
      # split; without the linear probe, the first kind.
      chosen = min(kinds, key=lambda kd: (-(out[kd]['holdout_top1'] or 0.0),
                                          out[kd]['holdout_loss'] or 0.0, kinds.index(kd)))
    results[name] = _assemble(name, out, chosen, config)   # Fractions, as the evaluators give.
    # Written after every evaluator, so a long run stopped midway keeps what it finished.
    _write(workdir, units.probe_results_to_percent(
        dict(results, **meta, complete=len(results) == len(names))))
  # Accuracies in percent from here on, with `"unit": "percent"` (evals/units.py).
  results = units.probe_results_to_percent(
      dict({n: results[n] for n in names}, **meta, complete=True))
  if distributed.is_main_process():
    print(_format_table(results))
  return results
