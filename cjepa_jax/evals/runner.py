"""One probe run of a frozen encoder: what `cjepa-probe` does (cjepa_jax/probe.py, the protocol).

  run(config, workdir)      checks, restore, features (once), every evaluator of `config.evals`,
                            the table, and `workdir/probe_results.json` (every accuracy in
                            percent, marked `"unit": "percent"`: evals/units.py).
  check_config(config)      ValueError naming the key for a bad probe config.
  evaluator_names(evals, probes)
                            the entries of `evals` that `config.probes` lists (unknown names:
                            ValueError).

`run` is where a probe config enters: it is read there once, into the data's, the encoder's and
the evaluators' specs that everything below takes.

Each evaluator's entry in the results and its table rows are its type's (`base.Type.entry`,
`.rows`): nothing here knows an evaluator by name.

Order matters for the user: the config and the label splits are checked before anything is
restored or extracted (mismatched class folders would give silently wrong accuracies), and the
features are extracted once, into the `FeatureCache` every evaluator reads.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

from absl import logging
import jax
import ml_collections

from cjepa_jax import distributed
from cjepa_jax import sharding
from cjepa_jax.data.spec import DataSpec
from cjepa_jax.evals import base
from cjepa_jax.evals import features as features_lib
from cjepa_jax.evals import registry
from cjepa_jax.evals import units

RESULTS_FILE = 'probe_results.json'


def evaluator_names(evals: base.EvalsSpec, probes: str) -> tuple[str, ...]:
  """The entries of `evals` that `probes` lists ('linear,knn,...': `config.probes`), in order,
  once."""
  known = tuple(sorted(evals.entries))
  listed = [n.strip() for n in str(probes).split(',') if n.strip()]
  if not listed:
    raise ValueError(f'config.probes is empty: list evaluators from {", ".join(known)}.')
  unknown = [n for n in listed if n not in known]
  if unknown:
    raise ValueError(f'Unknown evaluator(s) {", ".join(map(repr, unknown))} in config.evals; '
                     f'known: {", ".join(known)}.')
  return tuple(dict.fromkeys(listed))


def check_config(config: ml_collections.ConfigDict) -> None:
  """ValueError naming the key and its valid values for a bad probe config."""
  if not config.pretrained:
    raise ValueError('Set --config.pretrained to a pretraining workdir, a checkpoint step '
                     'directory (DIR/checkpoints/<step>) or `random` (the baseline).')
  evals = base.EvalsSpec.from_config(config)
  names = evaluator_names(evals, config.get('probes', ''))
  if config.encoder not in features_lib.ENCODER_KEYS:
    raise ValueError(f'config.encoder={config.encoder!r}: use one of '
                     f'{sorted(features_lib.ENCODER_KEYS)}.')
  if config.features not in features_lib.FEATURE_CHOICES:
    raise ValueError(f'config.features={config.features!r}: use one of '
                     f'{features_lib.FEATURE_CHOICES}.')
  if config.train_examples < 0 or config.eval_examples < 0:
    raise ValueError('config.train_examples / eval_examples must be >= 0 (0 = the whole split).')
  registry.check(evals, names)


def _row(name: str, kind: str, top1: float, top5: float | None, extra: str = '') -> str:
  top5_text = f'{top5:>8.2f}' if top5 is not None else f'{"":>8}'
  return f'{name:<24}{kind:<10}{top1:>8.2f}{top5_text}{extra}'


def _format_table(results: dict[str, Any], types: dict[str, Any]) -> str:
  """The probe's table: a head line, then each evaluator's rows (`Type.rows`), in percent."""
  lines = [f'{"probe":<24}{"features":<10}{"top1":>8}{"top5":>8}']
  for name, type_ in types.items():
    lines.extend(_row(*row) for row in type_.rows(name, results[name]))
  head = (f'{results["checkpoint"]} (step {results["step"]}, {results["model"]["variant"]}, '
          f'{results["dataset"]}, {results["num_train"]} train / {results["num_test"]} test): '
          'top-1 / top-5 in %; * = reported (chosen on the held-out train split)')
  return '\n'.join([head] + lines)


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
  evals, data = base.EvalsSpec.from_config(config), DataSpec.from_config(config)
  names = evaluator_names(evals, config.get('probes', ''))
  # Before restoring or extracting anything: mismatched class folders would give silently wrong
  # accuracies, and a listing is all it takes to find out.
  input_pipeline.check_label_splits(data)
  mesh = sharding.make_mesh(sharding.MeshSpec.from_config(config))
  sharding.check_batch_divisible(data.batch_size, mesh, jax.process_count())
  encoder, params, info = features_lib.restore_encoder(
      features_lib.EncoderSource.from_config(config), mesh)
  if info['image_size'] != data.image_size:
    logging.info('Using the checkpoint\'s image size %d (the probe config says %d).',
                 info['image_size'], data.image_size)
  kinds = features_lib.feature_kinds(evals.features)
  # The features at the resolution the encoder was trained at.
  features = features_lib.FeatureCache.for_probe(
      encoder, dataclasses.replace(data, image_size=info['image_size']), mesh,
      train_examples=evals.train_examples, eval_examples=evals.eval_examples)
  entries = evals.entries
  types = {name: registry.type_of(name, entries[name]) for name in names}
  evaluators = {name: registry.build(name, evals, data, mesh, encoder, features=features)
                for name in names}
  # Extracted here, once, for every evaluator: the union of the kinds they read.
  union = tuple(k for k in features_lib.ALL_KINDS
                if k in kinds or any(k in ev.kinds for ev in evaluators.values()))
  _, train_y = features.get(params, data.train_split, union)
  _, test_y = features.get(params, data.eval_split, union)
  logging.info('Features %s: %d train / %d test examples.', union, len(train_y), len(test_y))

  meta = {
      'evals': list(names),
      'checkpoint': info['checkpoint'],
      'step': info['step'],
      'encoder': info['encoder'],
      'model': info['model'],
      'image_size': info['image_size'],
      'dataset': data.dataset,
      'train_split': data.train_split,
      'eval_split': data.eval_split,
      'num_train': int(len(train_y)),
      'num_test': int(len(test_y)),
      'config': json.loads(config.to_json_best_effort()),
  }
  # An evaluator that chooses the feature kind (the linear probe) first: its held-out choice is
  # what the others report; without one, the first kind.
  order = sorted(names, key=lambda n: types[n].choose is None)
  chosen, results, chose = kinds[0], {}, False
  for name in order:
    logging.info('Evaluator %s ...', name)
    out = evaluators[name].evaluate(params)
    if types[name].choose is not None and not chose:
      chosen, chose = types[name].choose(out, kinds), True
    # Fractions, as the evaluators give.
    results[name] = types[name].entry(out, chosen, entries[name])
    # Written after every evaluator, so a long run stopped midway keeps what it finished.
    _write(workdir, units.probe_results_to_percent(
        dict(results, **meta, complete=len(results) == len(names))))
  # Accuracies in percent from here on, with `"unit": "percent"` (evals/units.py).
  results = units.probe_results_to_percent(
      dict({n: results[n] for n in names}, **meta, complete=True))
  if distributed.is_main_process():
    print(_format_table(results, types))
  return results
