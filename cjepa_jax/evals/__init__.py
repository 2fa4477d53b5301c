"""Evaluation: one registry of evaluator types, one config shape, wherever an evaluator runs.

Every evaluator has one entry shape in every config (base.py), in big_vision's manner:

  config.evals.<name> = dict(type=<a registered type>, every_steps=N, <its options>)

Pretraining's monitors (the entries with every_steps > 0, on the EMA target encoder), the probe
CLI (the entries `config.probes` lists, on one frozen checkpoint) and fine-tuning's evaluation
(on the classifier; its best checkpoint kept by the training loop) all build them through
`registry.py`, from an `EvalsSpec` (`config.evals`, read once where the config enters) and the
run's `DataSpec`.

Modules, one per concept (nothing is imported here: importing the package costs nothing, and the
trainer imports only what it runs):

  base.py       The interface: `EvalsSpec` (the entries, frozen), `Type` (build, check, logged
                values, result entry, table rows), `Context`, `Evaluator`, and the
                per-feature-kind helper.
  registry.py   The types by name (`register`, one line each), `build`, `monitors` (what a
                trainer runs, each on its own data subset), `check`.
  features.py   Restoring an encoder (`EncoderSource`: a checkpoint or `random`), pooled 'last'
                / 'last4' features, their batch-sharded extraction to host arrays, and
                `FeatureCache` (one extraction shared by every evaluator of a probe run).
  knn.py        'knn': DINO's weighted kNN vote over sharded training rows.
  linear.py     'linear': the linear probe, a vmapped (lr, wd) sweep chosen on held-out TRAIN
                rows; it chooses the feature kind the others report.
  lowshot.py    'lowshot': the linear probe on a class-balanced fraction of the train labels.
  fewshot.py    'fewshot': big_vision's closed-form ridge regression on k examples per class.
  attentive.py  'attentive': V-JEPA's cross-attention pooler over the final tokens.
  classify.py   'classify': fine-tuning's top-1 / top-5 of the classifier on the eval split.
  runner.py     One probe run: checks, restore, features, the listed evaluators, the table and
                `probe_results.json` (what `cjepa-probe` calls).
  units.py      Accuracy in percent in every file written (`"unit": "percent"`), and reading
                older files, which hold fractions, in percent.

Adding an evaluator: one file with its `base.Type`, and one line in `registry._BUILTIN` (or a
`registry.register(...)` call); then an entry `config.evals.<name>` in the config that runs it.
The probe protocol as a whole (what the paper does, and where we deviate) is in
cjepa_jax/probe.py's docstring, which `cjepa-probe --help` prints.
"""
