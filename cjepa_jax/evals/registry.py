"""Every evaluator type by name, and the one way each runner builds them from an `EvalsSpec`.

  names()                                      the registered types: 'attentive', 'classify',
                                               'fewshot', 'knn', 'linear', 'lowshot'.
  register(type_)                              adds a `base.Type` (a new evaluator: its file, and
                                               one line in `_BUILTIN` below).
  build(name, evals, data, mesh, model, *, features=None, kinds=None)
                                               the evaluator `config.evals.<name>` describes.
  monitors(evals, data, mesh, model)           [Monitor] that a trainer runs: the entries with
                                               `every_steps` > 0, each with its own data.
  check(evals, names)                          ValueError naming the key of a bad entry.
  result_types(results)                        {name: Type} of a probe_results.json's entries.

The config shape is `base.py`'s: `config.evals.<name> = dict(type=..., every_steps=...,
<options>)`, the same for pretraining's monitors, the probe CLI and fine-tuning's evaluation; the
entry points read it once into a `base.EvalsSpec` (its `periods()`: the trainer's cadences).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
import dataclasses
from typing import Any

import jax
from jax.sharding import Mesh

from cjepa_jax import sharding
from cjepa_jax.data.spec import DataSpec
from cjepa_jax.evals import attentive
from cjepa_jax.evals import base
from cjepa_jax.evals import classify
from cjepa_jax.evals import features as features_lib
from cjepa_jax.evals import fewshot
from cjepa_jax.evals import knn
from cjepa_jax.evals import linear
from cjepa_jax.evals import lowshot

# The built-in types: one line each.
_BUILTIN = (attentive.TYPE, classify.TYPE, fewshot.TYPE, knn.TYPE, linear.TYPE, lowshot.TYPE)
_TYPES: dict[str, base.Type] = {}


def register(type_: base.Type) -> base.Type:
  """Registers `type_` under `type_.name` (ValueError when the name is taken)."""
  if type_.name in _TYPES:
    raise ValueError(f'Evaluator {type_.name!r} is already registered.')
  _TYPES[type_.name] = type_
  return type_


for _type in _BUILTIN:
  register(_type)


def names() -> tuple[str, ...]:
  """The registered evaluator types, sorted."""
  return tuple(sorted(_TYPES))


def type_of(name: str, options: Any) -> base.Type:
  """The registered type of the entry `config.evals.<name>` (ValueError naming the known)."""
  kind = options.get('type', name) if hasattr(options, 'get') else name
  if kind not in _TYPES:
    raise ValueError(f'Unknown evaluator {kind!r} in config.evals; known: '
                     f'{", ".join(names())}.')
  return _TYPES[kind]


def result_types(results: Mapping[str, Any]) -> dict[str, base.Type]:
  """{name: its registered type} of the evaluator entries of a probe_results.json, any version.

  Newer files list their entries (`evals`) and keep the probe config, whose
  `evals.<name>.type` says each one's type; older ones hold an entry per evaluator under its
  type's name. An entry of a type no longer registered is left out.
  """
  names = results.get('evals')
  if not isinstance(names, list):
    names = [name for name, value in results.items() if name in _TYPES and isinstance(value, dict)]
  entries = (results.get('config') or {}).get('evals')
  out = {}
  for name in names:
    options = entries.get(name) if isinstance(entries, dict) else None
    kind = options.get('type', name) if isinstance(options, dict) else name
    if kind in _TYPES and isinstance(results.get(name), dict):
      out[name] = _TYPES[kind]
  return out


def check(evals: base.EvalsSpec, selected: Sequence[str] | None = None) -> None:
  """ValueError naming `config.evals.<name>.<key>` for a bad entry of `selected` (default: all)."""
  all_entries = evals.entries
  for name in (all_entries if selected is None else selected):
    options = all_entries[name]
    type_ = type_of(name, options)
    for key in ('every_steps', 'train_examples', 'eval_examples', 'eval_batch_size'):
      value = options.get(key, 0)
      base.check(isinstance(value, int) and not isinstance(value, bool) and value >= 0, name,
                 key, value, 'must be an integer >= 0 (0: off / the whole split / the default)')
    type_.check(name, options)


def build(name: str, evals: base.EvalsSpec, data: DataSpec, mesh: Mesh, model: Any, *,
          features: features_lib.FeatureCache | None = None,
          kinds: tuple[str, ...] | None = None) -> base.Evaluator:
  """The evaluator of `config.evals.<name>` (an unregistered name: a type of that name).

  Args:
    name: an entry of `evals`, or a registered type (`names()`) with no entry.
    evals: the run's evaluators (and a probe's `features`, `train_examples`, `eval_examples`).
    data: the run's data (its splits, classes, `seed` and `batch_size`).
    mesh: the devices it runs on.
    model: the module whose parameters `evaluate` receives.
    features: shared by the evaluators of one probe run so the features are extracted once;
      default: a cache of this evaluator's own (`FeatureCache.for_probe`).
    kinds: the feature kinds it reports; default: `evals.features`'.
  """
  options = evals.entries.get(name, base.Options({'type': name}))
  type_ = type_of(name, options)
  if type_.reads_features and features is None:
    features = features_lib.FeatureCache.for_probe(
        model, data, mesh, train_examples=evals.train_examples,
        eval_examples=evals.eval_examples)
  if kinds is None:
    kinds = features_lib.feature_kinds(evals.features)
  return type_.build(base.Context(data, mesh, model, features, tuple(kinds)), options)


@dataclasses.dataclass(frozen=True)
class Monitor:
  """An evaluator a trainer runs every `every_steps` steps (and at the last step)."""
  name: str
  every_steps: int
  evaluate: Callable[[Any], dict[str, Any]]   # params -> the values its metrics row gets.
  features: features_lib.FeatureCache | None  # Its own features (None: it reads none).


def monitors(evals: base.EvalsSpec, data: DataSpec, mesh: Mesh, model: Any) -> list[Monitor]:
  """The evaluators a trainer runs on `model`'s parameters: the entries with `every_steps` > 0.

  Each reads its own fixed subsets of the train / eval split (`train_examples` /
  `eval_examples`, 0: all) on the 'last' features, in batches of `eval_batch_size` (0: the run's
  `data.batch_size`); its `logged` values go into the metrics row (accuracies in percent with
  `'unit': 'percent'`, evals/units.py). Built now, so a bad dataset fails at start-up rather
  than at the first evaluation hours later.
  """
  check(evals)
  out = []
  for name, every in evals.periods().items():
    options = evals.entries[name]
    type_ = type_of(name, options)
    if type_.logged is None:
      raise ValueError(f'config.evals.{name}.every_steps={every}: the {type_.name} evaluator does '
                       'not run during training; set it to 0 (it runs in cjepa-probe).')
    features = None
    if type_.reads_features:
      features = features_lib.FeatureCache(
          model, data, mesh, batch_size=int(options.get('eval_batch_size', 0) or data.batch_size),
          num_examples={data.train_split: int(options.get('train_examples', 0)) or None,
                        data.eval_split: int(options.get('eval_examples', 0)) or None})
    evaluator = build(name, evals, data, mesh, model, features=features,
                      kinds=(features_lib.FEATURE_KINDS[0],))
    if features is not None:   # Its batches and labels, checked before any evaluation.
      from cjepa_jax.data import input_pipeline  # pylint: disable=g-import-not-at-top  (TF: host only)
      sharding.check_batch_divisible(features.batch_size, mesh, jax.process_count())
      input_pipeline.check_label_splits(data)
    logged = type_.logged
    out.append(Monitor(name, every, lambda params, e=evaluator, f=logged: f(e.evaluate(params)),
                       features))
  return out
