"""Every evaluator type by name, and the one way each runner builds them from `config.evals`.

  names()                                      the registered types: 'attentive', 'classify',
                                               'fewshot', 'knn', 'linear', 'lowshot'.
  register(type_)                              adds a `base.Type` (a new evaluator: its file, and
                                               one line in `_BUILTIN` below).
  build(name, config, mesh, model, *, features=None, kinds=None)
                                               the evaluator `config.evals.<name>` describes.
  monitors(config, mesh, model)                [Monitor] that a trainer runs: the entries with
                                               `every_steps` > 0, each with its own data.
  periods(config)                              {name: every_steps > 0} (the config alone).
  check(config, names)                         ValueError naming the key of a bad entry.

The config shape is `base.py`'s: `config.evals.<name> = dict(type=..., every_steps=...,
<options>)`, the same for pretraining's monitors, the probe CLI and fine-tuning's evaluation.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
import dataclasses
from typing import Any

import jax
from jax.sharding import Mesh
import ml_collections

from cjepa_jax import sharding
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


def entries(config: ml_collections.ConfigDict) -> dict[str, ml_collections.ConfigDict]:
  """{name: options} of `config.evals` (an empty dict without any)."""
  evals = config.get('evals')
  if not isinstance(evals, (ml_collections.ConfigDict, dict)):
    return {}
  return dict(evals.items())


def type_of(name: str, options: Any) -> base.Type:
  """The registered type of the entry `config.evals.<name>` (ValueError naming the known)."""
  kind = options.get('type', name) if hasattr(options, 'get') else name
  if kind not in _TYPES:
    raise ValueError(f'Unknown evaluator {kind!r} in config.evals; known: '
                     f'{", ".join(names())}.')
  return _TYPES[kind]


def check(config: ml_collections.ConfigDict, selected: Sequence[str] | None = None) -> None:
  """ValueError naming `config.evals.<name>.<key>` for a bad entry of `selected` (default: all)."""
  all_entries = entries(config)
  for name in (all_entries if selected is None else selected):
    options = all_entries[name]
    type_ = type_of(name, options)
    for key in ('every_steps', 'train_examples', 'eval_examples', 'eval_batch_size'):
      value = options.get(key, 0)
      base.check(isinstance(value, int) and not isinstance(value, bool) and value >= 0, name,
                 key, value, 'must be an integer >= 0 (0: off / the whole split / the default)')
    type_.check(name, options)


def build(name: str, config: ml_collections.ConfigDict, mesh: Mesh, model: Any, *,
          features: features_lib.FeatureCache | None = None,
          kinds: tuple[str, ...] | None = None) -> base.Evaluator:
  """The evaluator of `config.evals.<name>` (an unregistered name: a type of that name).

  Args:
    name: an entry of `config.evals`, or a registered type (`names()`) with no entry.
    config: the run's config: `data.*`, `seed`, `features` (a probe's) and `evals`.
    mesh: the devices it runs on.
    model: the module whose parameters `evaluate` receives.
    features: shared by the evaluators of one probe run so the features are extracted once;
      default: a cache of this evaluator's own (`FeatureCache.from_config`).
    kinds: the feature kinds it reports; default: `config.features`'.
  """
  options = entries(config).get(name, ml_collections.ConfigDict({'type': name}))
  type_ = type_of(name, options)
  if type_.reads_features and features is None:
    features = features_lib.FeatureCache.from_config(config, mesh, model)
  if kinds is None:
    kinds = features_lib.feature_kinds(config.get('features', 'last'))
  return type_.build(base.Context(config, mesh, model, features, tuple(kinds)), options)


@dataclasses.dataclass(frozen=True)
class Monitor:
  """An evaluator a trainer runs every `every_steps` steps (and at the last step)."""
  name: str
  every_steps: int
  evaluate: Callable[[Any], dict[str, Any]]   # params -> the values its metrics row gets.
  features: features_lib.FeatureCache | None  # Its own features (None: it reads none).


def periods(config: ml_collections.ConfigDict) -> dict[str, int]:
  """{name: every_steps > 0} of the evaluators a trainer runs (the config alone: no data)."""
  return {name: int(options.get('every_steps', 0))
          for name, options in entries(config).items() if options.get('every_steps', 0) > 0}


def monitors(config: ml_collections.ConfigDict, mesh: Mesh, model: Any) -> list[Monitor]:
  """The evaluators a trainer runs on `model`'s parameters: the entries with `every_steps` > 0.

  Each reads its own fixed subsets of the train / eval split (`train_examples` /
  `eval_examples`, 0: all) on the 'last' features, in batches of `eval_batch_size` (0: the run's
  `batch_size`); its `logged` values go into the metrics row (accuracies in percent with
  `'unit': 'percent'`, evals/units.py). Built now, so a bad dataset fails at start-up rather
  than at the first evaluation hours later.
  """
  check(config)
  out = []
  for name, every in periods(config).items():
    options = entries(config)[name]
    type_ = type_of(name, options)
    if type_.logged is None:
      raise ValueError(f'config.evals.{name}.every_steps={every}: the {type_.name} evaluator does '
                       'not run during training; set it to 0 (it runs in cjepa-probe).')
    features = None
    if type_.reads_features:
      from cjepa_jax.data import input_pipeline  # pylint: disable=g-import-not-at-top  (TF: host only)
      batch_size = int(options.get('eval_batch_size', 0) or config.batch_size)
      sharding.check_batch_divisible(batch_size, mesh, jax.process_count())
      input_pipeline.check_label_splits(config)
      features = features_lib.FeatureCache(
          model, config, mesh, batch_size=batch_size, num_examples={
              config.data.train_split: int(options.get('train_examples', 0)) or None,
              config.data.eval_split: int(options.get('eval_examples', 0)) or None})
    evaluator = build(name, config, mesh, model, features=features,
                      kinds=(features_lib.FEATURE_KINDS[0],))
    logged = type_.logged
    out.append(Monitor(name, every, lambda params, e=evaluator, f=logged: f(e.evaluate(params)),
                       features))
  return out
