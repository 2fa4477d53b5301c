"""One probe run of a frozen encoder: what `cjepa-probe` does (cjepa_jax/probe.py, the protocol).

  run(config, workdir)   checks, restore, features, the linear and kNN probes, the table, and
                         `workdir/probe_results.json` (every accuracy a fraction in [0, 1]).
  check_config(config)   ValueError naming the key for a bad probe config.

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

RESULTS_FILE = 'probe_results.json'


def check_config(config: ml_collections.ConfigDict) -> None:
  """ValueError naming the key and its valid values for a bad probe config."""
  if not config.pretrained:
    raise ValueError('Set --config.pretrained to a pretraining workdir, a checkpoint step '
                     'directory (DIR/checkpoints/<step>) or `random` (the baseline).')
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


def _format_table(results: dict[str, Any]) -> str:
  lin, knn = results['linear'], results['knn']
  lines = [f'{"probe":<22}{"features":<10}{"top1":>8}{"top5":>8}']
  for kind, r in lin['per_features'].items():
    mark = '*' if kind == lin['features'] else ' '
    lines.append(f'{"linear " + mark:<22}{kind:<10}{r["top1"]:>8.4f}{r["top5"]:>8.4f}'
                 f'   lr={r["best_lr"]:g} wd={r["best_wd"]:g}'
                 + (f' holdout={r["holdout_top1"]:.4f}' if r['holdout_top1'] is not None else ''))
  for kind, r in knn['per_features'].items():
    mark = '*' if kind == knn['features'] else ' '
    name = f'knn k={knn["k"]} T={knn["temperature"]:g} {mark}'
    lines.append(f'{name:<22}{kind:<10}{r["top1"]:>8.4f}{r["top5"]:>8.4f}')
  head = (f'{results["checkpoint"]} (step {results["step"]}, {results["model"]["variant"]}, '
          f'{results["dataset"]}): accuracies are fractions; * = reported (chosen on the '
          'held-out train split)')
  return '\n'.join([head] + lines)


def run(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Restores the encoder, extracts features, runs the linear and kNN probes; writes the JSON.

  Returns the results dict that `workdir/probe_results.json` holds (accuracies as fractions).
  Call on every process; only the main process writes and prints.
  """
  from cjepa_jax import input_pipeline  # pylint: disable=g-import-not-at-top  (TF: host only)

  check_config(config)
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
  # Extracted here, once; the evaluators read the same arrays from the cache.
  train_f, train_y = features.get(params, config.data.train_split, kinds)
  _, test_y = features.get(params, config.data.eval_split, kinds)
  logging.info('Features: %d train / %d test examples, %s.', len(train_y), len(test_y),
               {k: v.shape[1] for k, v in train_f.items()})

  evaluators = {name: registry.build(name, config, mesh, encoder, features=features)
                for name in ('linear', 'knn')}
  linear = evaluators['linear'].evaluate(params)
  knn = evaluators['knn'].evaluate(params)
  # 'both': the better kind on the held-out train rows (ties: 'last'), never on the test split.
  chosen = min(kinds, key=lambda kd: (-(linear[kd]['holdout_top1'] or 0.0),
                                      linear[kd]['holdout_loss'] or 0.0, kinds.index(kd)))

  results = {
      'linear': dict(linear[chosen], features=chosen,
                     per_features={kd: {k: v for k, v in r.items() if k != 'sweep'}
                                   for kd, r in linear.items()}),
      'knn': dict(top1=knn[chosen]['top1'], top5=knn[chosen]['top5'], k=int(config.knn.k),
                  temperature=float(config.knn.temperature), features=chosen,
                  per_features={kd: dict(top1=r['top1'], top5=r['top5']) for kd, r in knn.items()}),
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
      'accuracy_units': 'fraction',
      'config': json.loads(config.to_json_best_effort()),
  }
  if distributed.is_main_process():
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, RESULTS_FILE), 'w', encoding='utf-8') as f:
      json.dump(results, f, indent=2)
    print(_format_table(results))
  return results
