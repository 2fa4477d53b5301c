"""What every evaluator is: one `Type` per file, built the same way wherever it runs.

An evaluator's config entry has one shape in every config (big_vision's):

  config.evals.<name> = dict(type='knn', every_steps=0, <its options>)

`type` names a registered `Type` (registry.py; `name` may differ from it, so one type can run
twice with other options); `every_steps` > 0 runs it during training every that many steps and at
the last step (the probe CLI ignores it: it runs the entries `config.probes` lists). A trainer's
evaluator reads its data as `train_examples` / `eval_examples` (a fixed subset of that many of the
train / eval split, 0: all) in batches of `eval_batch_size` (0: the run's `batch_size`); a probe
run extracts the features once for every evaluator, from its config's own keys.

A `Type` owns everything of its kind: how its options are checked, how it is built, the values it
adds to a trainer's metrics row, its entry in probe_results.json, its rows of the probe's table,
and its rows and protocol sentence in an exported encoder's model card. Nothing outside its file
branches on its name.

`EvalsSpec.from_config(config)` reads `config.evals` (and a probe's feature keys) once, where the
config enters; the registry and every evaluator take the spec, its entries' options frozen.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
import dataclasses
from typing import Any

from jax.sharding import Mesh
import ml_collections

from cjepa_jax.data.spec import DataSpec
from cjepa_jax.evals import features as features_lib

Params = Any
Results = dict[str, Any]
Options = ml_collections.FrozenConfigDict   # One entry of `config.evals`, read-only.


@dataclasses.dataclass(frozen=True)
class EvalsSpec:
  """The evaluators of a run: `config.evals`, and the feature keys of a probe config."""
  entries: Mapping[str, Options]   # {name: its options}, in the config's order.
  features: str = 'last'           # A probe's `features`: 'last', 'last4' or 'both'.
  train_examples: int = 0          # A probe's subsets of the train / eval split (0: all).
  eval_examples: int = 0

  @classmethod
  def from_config(cls, config: ml_collections.ConfigDict) -> EvalsSpec:
    """Reads `config.evals` (none without it) and, in a probe config, `features`,
    `train_examples` and `eval_examples`."""
    evals = config.get('evals')
    entries = {}
    if isinstance(evals, (ml_collections.ConfigDict, dict)):
      for name, options in evals.items():
        entry = isinstance(options, (ml_collections.ConfigDict, dict))
        entries[name] = ml_collections.FrozenConfigDict(options) if entry else options
    return cls(entries, config.get('features', 'last'), int(config.get('train_examples', 0)),
               int(config.get('eval_examples', 0)))

  def periods(self) -> dict[str, int]:
    """{name: every_steps > 0} of the evaluators a trainer runs."""
    return {name: int(options.get('every_steps', 0)) for name, options in self.entries.items()
            if hasattr(options, 'get') and options.get('every_steps', 0) > 0}


@dataclasses.dataclass(frozen=True)
class Context:
  """What an evaluator is built from."""
  data: DataSpec                      # The run's data: its splits, classes, `seed`, `batch_size`.
  mesh: Mesh
  model: Any                          # The module whose parameters `evaluate` receives.
  features: features_lib.FeatureCache | None   # The run's features (None: it reads no features).
  kinds: tuple[str, ...]              # The feature kinds it reports ('last' in training).


@dataclasses.dataclass(frozen=True)
class Evaluator:
  """One evaluation of a model: `evaluate(params) -> results`.

  Call it on every process (feature extraction and the probes run collectives). `kinds`: the
  features it reads from the run's cache (the probe extracts their union in one pass).
  """
  evaluate: Callable[[Params], Results]
  kinds: tuple[str, ...] = ()


def _no_check(name: str, options: Options) -> None:
  del name, options


def _as_is(out: Results, chosen: str, options: Options) -> dict[str, Any]:
  del options
  return dict(out[chosen], features=chosen) if chosen in out else dict(out)


def _top1_row(name: str, entry: dict[str, Any]) -> list[tuple[Any, ...]]:
  return [(name, entry.get('features', ''), entry['top1'], entry.get('top5'), '')]


def card_percent(value: float | None) -> str:
  """A model card's accuracy cell: percent with one decimal ('' for none)."""
  return '' if value is None else f'{float(value):.1f}'


def card_number(value: Any) -> str:
  """A model card's hyperparameter: `g`-formatted if a number."""
  return f'{value:g}' if isinstance(value, (int, float)) else str(value)


@dataclasses.dataclass(frozen=True)
class Type:
  """One kind of evaluator, registered once (registry.py) and used by every runner."""
  name: str
  build: Callable[[Context, Options], Evaluator]
  # ValueError naming `config.evals.<name>.<key>` for an option no run can mean.
  check: Callable[[str, Options], None] = _no_check
  # Its values in a trainer's metrics row, from its results on the 'last' features (None: it does
  # not run in a trainer).
  logged: Callable[[Results], dict[str, Any]] | None = None
  # Its entry in probe_results.json (fractions): (results, the reported kind, options) -> entry.
  entry: Callable[[Results, str, Options], dict[str, Any]] = _as_is
  # Its rows in the probe's table (entry in percent): (label, features, top1, top5, notes).
  rows: Callable[[str, dict[str, Any]], list[tuple[Any, ...]]] = _top1_row
  # The feature kind to report, chosen from its results (the linear probe's held-out choice);
  # such an evaluator runs first and the others report the kind it chose.
  choose: Callable[[Results, tuple[str, ...]], str] | None = None
  # Whether it reads features from the run's cache (fine-tuning's `classify` runs the model).
  reads_features: bool = True
  # Its rows in a model card (hf_card.py) from its probe_results.json entry in percent, of any
  # version: (evaluator, features, top-1, top-5, notes) as text. None: it has none.
  card_rows: Callable[[str, dict[str, Any]], list[tuple[str, ...]]] | None = None
  # What it does, one clause of the model card's protocol sentence.
  card_protocol: str = ''


def per_kind(ctx: Context, probe_fn: Callable[..., dict[str, Any]]) -> Evaluator:
  """An Evaluator running `probe_fn(train_x, train_y, test_x, test_y)` on each feature kind."""
  kinds, data, features = ctx.kinds, ctx.data, ctx.features

  def evaluate(params: Params) -> Results:
    train_f, train_y = features.get(params, data.train_split, kinds)
    test_f, test_y = features.get(params, data.eval_split, kinds)
    return {kind: probe_fn(train_f[kind], train_y, test_f[kind], test_y) for kind in kinds}

  return Evaluator(evaluate, kinds)


def check(ok: bool, name: str, key: str, value: Any, valid: str) -> None:
  """ValueError `config.evals.<name>.<key>=<value> is invalid: <valid>.` unless `ok`."""
  if not ok:
    raise ValueError(f'config.evals.{name}.{key}={value!r} is invalid: {valid}.')
