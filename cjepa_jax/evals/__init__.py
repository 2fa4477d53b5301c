"""Frozen-encoder evaluation: what the probe CLI and the trainer's monitors run.

Modules, one per concept (nothing is imported here: importing the package costs nothing, and the
trainer imports only what it runs):

  features.py   Restoring an encoder from a checkpoint (or `random`), pooled 'last' / 'last4'
                features, their batch-sharded extraction to host arrays, and `FeatureCache`
                (one extraction shared by every evaluator of a probe run).
  knn.py        DINO's weighted kNN vote over sharded training rows, and the trainer's periodic
                kNN monitor (`make_knn_evaluator`).
  linear.py     The linear probe: a vmapped (lr, wd) sweep chosen on held-out TRAIN rows.
  registry.py   Evaluator names -> builders with one interface (`build`), and `in_training`:
                the evaluators the trainer runs, with their periods.
  runner.py     One probe run: checks, restore, features, the registered probes, the table and
                `probe_results.json` (what `cjepa-probe` calls).
  units.py      Accuracy in percent in every file written (`"unit": "percent"`), and reading
                older files, which hold fractions, in percent.

The protocol as a whole (what the paper does, and where we deviate) is in cjepa_jax/probe.py's
docstring, which `cjepa-probe --help` prints.
"""
