"""Evaluators by name, built through one interface, and the ones the trainer runs.

  build(name, config, mesh, encoder, *, features=None)   an Evaluator for a probe config.
  names()                                                 the registered names: 'attentive',
                                                          'fewshot', 'knn', 'linear', 'lowshot'.
  in_training(config, mesh, encoder)                      [(name, every_steps, Evaluator)] that
                                                          the trainer runs during pretraining.

An `Evaluator` holds `evaluate(encoder_params) -> dict` and `kinds`, the features it reads. The
trainer's return flat floats in percent, with `'unit': 'percent'` (it logs them as metrics:
{'knn_top1', 'knn_top5', 'fewshot_10shot', ..., 'unit'}); a probe run's return their result per
feature kind ({'last': {...}, 'last4': {...}}; the attentive probe's under 'tokens'), in
fractions, which the runner assembles into probe_results.json in percent.

The evaluators of one probe run share a `features.FeatureCache`: the features of one parameters
object are extracted once (minutes on CIFAR-10) and read by every evaluator. Adding an evaluator
is one `@register('name')` builder here.
"""

from __future__ import annotations

from collections.abc import Callable
import dataclasses
import functools
from typing import Any

from jax.sharding import Mesh
import ml_collections

from cjepa_jax.evals import attentive as attentive_lib
from cjepa_jax.evals import features as features_lib
from cjepa_jax.evals import fewshot as fewshot_lib
from cjepa_jax.evals import knn as knn_lib
from cjepa_jax.evals import linear as linear_lib
from cjepa_jax.evals import units
from cjepa_jax.models import vit

Params = Any
Results = dict[str, Any]


@dataclasses.dataclass(frozen=True)
class Evaluator:
  """One evaluation of an encoder: `evaluate(encoder_params) -> results`.

  Call it on every process (feature extraction and the probes run collectives). `kinds`: the
  features it reads from the run's cache (the runner extracts their union in one pass).
  """
  evaluate: Callable[[Params], Results]
  kinds: tuple[str, ...] = ()


Builder = Callable[[ml_collections.ConfigDict, Mesh, vit.Encoder, features_lib.FeatureCache],
                   Evaluator]
_BUILDERS: dict[str, Builder] = {}


def register(name: str) -> Callable[[Builder], Builder]:
  """Registers `builder(config, mesh, encoder, features) -> Evaluator` under `name`."""

  def add(builder: Builder) -> Builder:
    if name in _BUILDERS:
      raise ValueError(f'Evaluator {name!r} is already registered.')
    _BUILDERS[name] = builder
    return builder

  return add


def names() -> tuple[str, ...]:
  """The registered evaluator names, sorted."""
  return tuple(sorted(_BUILDERS))


def build(name: str, config: ml_collections.ConfigDict, mesh: Mesh, encoder: vit.Encoder, *,
          features: features_lib.FeatureCache | None = None) -> Evaluator:
  """The evaluator `name` for a probe config (see configs/probe_linear.py).

  Args:
    name: a registered name (`names()`).
    config: the probe config: its `features`, `seed`, `data.*` and the evaluator's own keys.
    mesh: the devices the probe runs on.
    encoder: the module whose parameters `evaluate` receives.
    features: shared by the evaluators of one run so the features are extracted once; default:
      a cache of this evaluator's own, from `config`.
  """
  if name not in _BUILDERS:
    raise ValueError(f'Unknown evaluator {name!r} in config.evals; known: {", ".join(names())}.')
  if features is None:
    features = features_lib.FeatureCache.from_config(config, mesh, encoder)
  return _BUILDERS[name](config, mesh, encoder, features)


def _splits(config: ml_collections.ConfigDict, features: features_lib.FeatureCache,
            params: Params, kinds: tuple[str, ...]) -> tuple[Any, ...]:
  """(train features, train labels, test features, test labels) from the cache."""
  train_f, train_y = features.get(params, config.data.train_split, kinds)
  test_f, test_y = features.get(params, config.data.eval_split, kinds)
  return train_f, train_y, test_f, test_y


def _per_kind(config: ml_collections.ConfigDict, features: features_lib.FeatureCache,
              probe_fn: Callable[..., dict[str, Any]]) -> Evaluator:
  """An Evaluator running `probe_fn(train_x, train_y, test_x, test_y)` on each feature kind."""
  kinds = features_lib.feature_kinds(config.features)

  def evaluate(params: Params) -> Results:
    train_f, train_y, test_f, test_y = _splits(config, features, params, kinds)
    return {kind: probe_fn(train_f[kind], train_y, test_f[kind], test_y) for kind in kinds}

  return Evaluator(evaluate, kinds)


@register('linear')
def _linear(config: ml_collections.ConfigDict, mesh: Mesh, encoder: vit.Encoder,
            features: features_lib.FeatureCache) -> Evaluator:
  """{kind: `linear.linear_probe` result} for every kind of `config.features` (`linear.*`)."""
  del encoder  # The features come from the cache.
  lin = config.linear
  return _per_kind(config, features, functools.partial(
      linear_lib.linear_probe, num_classes=int(config.data.num_classes), lrs=lin.lrs,
      wds=lin.wds, epochs=lin.epochs, batch_size=lin.batch_size,
      holdout_fraction=lin.holdout_fraction, retrain=lin.retrain, seed=config.seed, mesh=mesh))


@register('knn')
def _knn(config: ml_collections.ConfigDict, mesh: Mesh, encoder: vit.Encoder,
         features: features_lib.FeatureCache) -> Evaluator:
  """{kind: `knn.knn_probe` result} per kind of `config.features` (`config.knn.*`)."""
  del encoder  # The features come from the cache.
  return _per_kind(config, features, functools.partial(
      knn_lib.knn_probe, num_classes=int(config.data.num_classes), k=config.knn.k,
      temperature=config.knn.temperature, mesh=mesh))


@register('fewshot')
def _fewshot(config: ml_collections.ConfigDict, mesh: Mesh, encoder: vit.Encoder,
             features: features_lib.FeatureCache) -> Evaluator:
  """{kind: `fewshot.fewshot_probe` result} per kind of `config.features` (`fewshot.*`)."""
  del encoder
  fs = config.fewshot
  return _per_kind(config, features, functools.partial(
      fewshot_lib.fewshot_probe, num_classes=int(config.data.num_classes), shots=fs.shots,
      seeds=int(fs.seeds), l2_reg=float(fs.l2_reg), seed=int(config.seed), mesh=mesh))


@register('lowshot')
def _lowshot(config: ml_collections.ConfigDict, mesh: Mesh, encoder: vit.Encoder,
             features: features_lib.FeatureCache) -> Evaluator:
  """{kind: {'1%': linear result, ...}}: the linear probe (`linear.*` grid and protocol) fitted on
  a seeded class-balanced `lowshot.fractions` of the train labels (`linear.lowshot_indices`)."""
  del encoder
  lin, num_classes = config.linear, int(config.data.num_classes)

  def probe(train_x, train_y, test_x, test_y):
    out = {}
    for fraction in config.lowshot.fractions:
      idx = linear_lib.lowshot_indices(train_y, float(fraction), int(config.seed), num_classes)
      r = linear_lib.linear_probe(
          train_x[idx], train_y[idx], test_x, test_y, num_classes=num_classes, lrs=lin.lrs,
          wds=lin.wds, epochs=int(config.lowshot.epochs), batch_size=lin.batch_size,
          holdout_fraction=lin.holdout_fraction, retrain=lin.retrain, seed=config.seed,
          mesh=mesh)
      out[f'{100 * float(fraction):g}%'] = dict(
          {k: v for k, v in r.items() if k != 'sweep'}, fraction=float(fraction),
          num_train=int(len(idx)))
    return out

  return _per_kind(config, features, probe)


@register('attentive')
def _attentive(config: ml_collections.ConfigDict, mesh: Mesh, encoder: vit.Encoder,
               features: features_lib.FeatureCache) -> Evaluator:
  """{'tokens': `attentive.attentive_probe` result} on the final tokens (`attentive.*`)."""
  att = config.attentive
  heads = int(att.num_heads) or int(encoder.num_heads)
  kinds = (features_lib.TOKENS,)

  def evaluate(params: Params) -> Results:
    train_f, train_y, test_f, test_y = _splits(config, features, params, kinds)
    return {features_lib.TOKENS: attentive_lib.attentive_probe(
        train_f[features_lib.TOKENS], train_y, test_f[features_lib.TOKENS], test_y,
        num_classes=int(config.data.num_classes), lrs=att.lrs, wds=att.wds,
        epochs=int(att.epochs), batch_size=int(att.batch_size),
        holdout_fraction=float(att.holdout_fraction), num_queries=int(att.num_queries),
        num_heads=heads, mlp_ratio=float(att.mlp_ratio), warmup_epochs=float(att.warmup_epochs),
        seed=int(config.seed), mesh=mesh, progress=True)}

  return Evaluator(evaluate, kinds)


def in_training_periods(config: ml_collections.ConfigDict) -> dict[str, int]:
  """{name: every_steps > 0} of the evaluators the trainer runs (the config alone: no data)."""
  evals = config.get('evals', ml_collections.ConfigDict())
  periods = {'knn': int(evals.get('knn_every_steps', 0)),
             'fewshot': int(evals.get('fewshot_every_steps', 0))}
  return {name: every for name, every in periods.items() if every > 0}


def in_training(config: ml_collections.ConfigDict, mesh: Mesh, encoder: vit.Encoder
                ) -> list[tuple[str, int, Evaluator]]:
  """The evaluators the trainer runs on `target_params`, each with its period in steps.

  The kNN monitor (`knn.make_knn_evaluator`) every `evals.knn_every_steps` steps, results
  {'knn_top1', 'knn_top5'}; the few-shot monitor (`fewshot.make_fewshot_evaluator`) every
  `evals.fewshot_every_steps`, results {'fewshot_<k>shot'} (0: none). Their top-1 / top-5 are
  logged in percent, each result with `'unit': 'percent'` (evals/units.py), so metrics.jsonl rows
  say their unit. Built now, so a bad dataset fails at start-up rather than at the first
  evaluation hours later.
  """
  makers = {'knn': knn_lib.make_knn_evaluator, 'fewshot': fewshot_lib.make_fewshot_evaluator}

  def in_percent(evaluate: Callable[[Params], dict[str, float]]) -> Callable[[Params], Results]:
    @functools.wraps(evaluate)   # Keeps its attributes (knn's `feature_fn`).
    def evaluate_percent(params: Params) -> Results:
      return units.monitor_to_percent(evaluate(params))
    return evaluate_percent

  return [(name, every, Evaluator(in_percent(makers[name](config, mesh, encoder)), ('last',)))
          for name, every in in_training_periods(config).items()]
