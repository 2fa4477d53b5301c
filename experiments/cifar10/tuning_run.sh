#!/bin/bash
# One tuning run of RESULTS.md's tuning protocol: the recipe's OBJECTIVE with the given overrides
# on a 4-epoch schedule, stopped after 1 epoch (its step-781 checkpoint), then the subset probe of
# that checkpoint. The probe's train-holdout linear top-1 is what the run is judged on, against the
# recipe's own 4-epoch run at step 781 (experiments/cifar10/tuning_plot.py).
# Usage (repository root): bash experiments/cifar10/tuning_run.sh RUNDIR OBJECTIVE [--config.X=V ...]
#   e.g. bash experiments/cifar10/tuning_run.sh runs/ctune_lr5 cjepa --config.optim.lr=5e-4 --config.optim.start_lr=1e-4
# Writes RUNDIR (the training workdir, with metrics.jsonl) and RUNDIR/probe (probe_results.json).
#
# How it stops: `--config.stop_at_step=STOP` ends the start at step STOP (781) with a checkpoint
# there, inside the schedules of the whole 4 epochs (the lr, weight decay and EMA schedules stay
# laid over 3,124 steps); the same command without it would resume and finish the 4 epochs exactly.
set -euo pipefail
STOP=${STOP:-781}   # Overridable for a smoke test only.
if [ $# -lt 2 ]; then
  echo "usage: $0 RUNDIR OBJECTIVE [--config.X=V ...] (OBJECTIVE: a configs/cifar10_vit_tiny.py objective)" >&2
  exit 2
fi
dir=$1; objective=$2; shift 2
python -m cjepa_jax.train --config "configs/cifar10_vit_tiny.py:$objective" --workdir "$dir" \
  --config.epochs=4 --config.stop_at_step=$STOP --config.keep_every_steps=$STOP \
  --config.evals.knn.every_steps=391 "$@"
python -m cjepa_jax.probe --config configs/probe_linear.py --config.pretrained="$dir/checkpoints/$STOP" \
  --config.train_examples=10000 --config.eval_examples=2000 --config.probes=linear,knn,fewshot \
  --workdir "$dir/probe"
