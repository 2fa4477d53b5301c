r"""Frozen-encoder evaluations of an orbax checkpoint (or a random encoder): any list of them.

  python -m cjepa_jax.probe --config configs/probe_linear.py \
      --config.pretrained=runs/cifar10_ijepa --workdir runs/cifar10_ijepa/probe \
      [--config.probes=linear,knn,attentive,fewshot,lowshot --config.evals.knn.k=10]

`--config.probes` lists the entries of `config.evals` to run (default linear,knn,fewshot,lowshot);
each entry is an evaluator with its options, `config.evals.<name> = dict(type=..., <options>)`, the
shape every evaluator has wherever it runs (cjepa_jax/evals/base.py); an unknown name is one line
listing the known ones. The few-shot (evals/fewshot.py), low-shot (evals/lowshot.py) and attentive
(evals/attentive.py) protocols are in their modules; the linear and kNN protocols are below.

(also installed as `cjepa-probe`). `--config.pretrained` is a pretraining workdir (its latest
complete checkpoint), one checkpoint step directory (`DIR/checkpoints/<step>`), or the word
`random`: a randomly initialised encoder of the probe config's `model.*`, the baseline every table
of results needs. Prints a table and writes `DIR/probe_results.json`; every accuracy there is in
PERCENT (the file says `"unit": "percent"`; files of older versions, without that key, hold
fractions in [0, 1]: `cjepa_jax/evals/units.py` reads both).

What is restored: only the encoder weights, `target_params` (the EMA target encoder, the one the
paper evaluates) with `--config.encoder=target` (default) or `params/encoder` (the context encoder)
with `--config.encoder=context` (for a fine-tuning workdir, whose only encoder that is: the
fine-tuned one; the default `target` is refused there in one line saying so), plus the model
config saved with the checkpoint (variant, depth,
dtype, scan layout and the pretraining `data.image_size`, which the probe then uses). Never the
predictor or the optimizer state. Parameters are replicated over the mesh; batches are split over
every device.

Protocol (the I-JEPA paper's, after MSN / DINO, with the deviations marked):
  * Labels: before anything is restored, the train and eval splits must have the same classes in
    the same order, at least 2, and `data.num_classes` of them (see
    `input_pipeline.check_label_splits`); otherwise label ids would silently mean different
    classes.
  * Features of the frozen encoder on the evaluation preprocessing (resize the short side, centre
    crop, normalise), extracted once per split by one jitted, batch-sharded function. The padded
    rows of the last batch (`valid = False`) are dropped.
  * 'last': the average-pooled final tokens (after the encoder's final LayerNorm). 'last4': the
    concatenation of the last 4 blocks' outputs, each passed through the encoder's final LayerNorm
    (DINO's `get_intermediate_layers` convention, which MSN and I-JEPA follow) and then
    average-pooled ([B, 4D]). An encoder shallower than 4 blocks uses all its blocks. 'both' runs
    both and reports the better one, chosen on the held-out part of the TRAIN split (the paper
    reports the better of the two without saying on what; we never select on the test split).
  * Linear probe: a linear softmax classifier on the standardised features (mean / std of the
    training examples it is fitted on), zero-initialised, Adam with a cosine decay of the learning
    rate to 0, an L2 penalty `wd / 2 * |W|^2` on the kernel (coupled, i.e. added to the gradient;
    `wd` is the regularisation strength of a logistic regression, independent of the learning
    rate), minibatches of `evals.linear.batch_size` for `evals.linear.epochs` epochs. Every (lr, wd) of the
    grid is trained at once (vmapped). The best is chosen by top-1 accuracy (ties: lower loss) on
    a random `evals.linear.holdout_fraction` of the train split that the sweep does not train on;
    with `evals.linear.retrain` (default) that (lr, wd) is then retrained on the whole train split and
    evaluated once on the test split. Deviation: the paper (like DINO / MSN) trains the linear
    head on augmented crops through the frozen encoder; pre-extracted centre-crop features are far
    cheaper and typically score slightly lower.
  * kNN (DINO's protocol): L2-normalised features, cosine similarity to every training example,
    the k = 20 nearest vote for their class with weight exp(sim / T), T = 0.07; top-1 / top-5 of
    the summed votes. It uses the features the linear probe chose ('last' or 'last4');
    `knn.per_features` reports each kind.

The code is the package cjepa_jax/evals/ (this module is only the command line): `features`
(restore, features), `base` (the interface every evaluator implements), `knn`, `linear`,
`lowshot`, `fewshot`, `attentive`, `registry` (the evaluators by name, which the trainers' monitors
use too) and `runner` (this
run: one feature extraction for all evaluators, one table, probe_results.json).
"""

from __future__ import annotations

from collections.abc import Sequence
import sys
from typing import Any

from absl import app
from absl import flags
from ml_collections import config_flags

from cjepa_jax import cli
from cjepa_jax import config as config_lib
from cjepa_jax import errorlog
from cjepa_jax import metrics as metrics_lib
from cjepa_jax.evals import runner

_FLAGS: dict[str, Any] = {}


def _define_flags() -> None:
  """Defines --config and --workdir on first use, not at import.

  cjepa_jax.train defines flags of the same names; absl forbids two modules defining one flag, so
  the probe's are defined only when the probe is the program.
  """
  if not _FLAGS:
    _FLAGS['config'] = config_flags.DEFINE_config_file(
        'config', None, 'Probe config (configs/probe_linear.py[:cifar10|imagenet]).',
        lock_config=True)
    _FLAGS['workdir'] = flags.DEFINE_string(
        'workdir', None, 'Where probe_results.json goes.')


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  config, workdir = _FLAGS['config'].value, _FLAGS['workdir'].value
  if config is None or workdir is None:
    raise app.UsageError('--config and --workdir are required, e.g. --config '
                         'configs/probe_linear.py --config.pretrained=runs/cifar10_ijepa '
                         '--workdir runs/cifar10_ijepa/probe')
  metrics_lib.quiet_library_logs()   # orbax's ~15 INFO lines per restore stay off the console.
  errorlog.divert_library_errors(workdir)  # A damaged checkpoint's tracebacks: errors.log.
  runner.run(config, workdir)   # Bad input: one line and exit 1 (cli.run).


def run() -> None:
  """Console-script entry point (`cjepa-probe`): flags, jax.distributed start-up, then `main`."""
  _define_flags()
  cli.run('cjepa-probe', main, doc=__doc__, module=sys.argv[0] if __name__ == '__main__'
          else __name__, renamed=config_lib.RENAMED_PROBE)


if __name__ == '__main__':
  run()
