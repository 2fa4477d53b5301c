#!/bin/bash
# One tuning run of RESULTS.md's issue-17 protocol: the recipe's OBJECTIVE with the given
# overrides on a 4-epoch schedule, stopped (Ctrl-C, which checkpoints and exits) once its step-781
# (1-epoch) checkpoint is written, then the subset probe of that checkpoint. The probe's
# train-holdout linear top-1 is what the run is judged on, against the recipe's own 4-epoch run
# at step 781 (benchmarks/tuning_plot.py).
# Usage (repository root): bash benchmarks/cifar10_tuning_run.sh RUNDIR OBJECTIVE [--config.X=V ...]
#   e.g. bash benchmarks/cifar10_tuning_run.sh runs/ctune_lr5 cjepa --config.optim.lr=5e-4 --config.optim.start_lr=1e-4
# Writes RUNDIR (the training workdir, with metrics.jsonl) and RUNDIR/probe (probe_results.json).
set -euo pipefail
if [ $# -lt 2 ]; then
  echo "usage: $0 RUNDIR OBJECTIVE [--config.X=V ...] (OBJECTIVE: a configs/cifar10_vit_tiny.py objective)" >&2
  exit 2
fi
dir=$1; objective=$2; shift 2
python -m cjepa_jax.train --config "configs/cifar10_vit_tiny.py:$objective" --workdir "$dir" \
  --config.epochs=4 --config.ckpt_every_steps=781 --config.keep_every_steps=781 \
  --config.evals.knn_every_steps=391 "$@" &
pid=$!
until [ -d "$dir/checkpoints/781" ] || ! kill -0 $pid 2>/dev/null; do sleep 5; done
if [ ! -d "$dir/checkpoints/781" ]; then
  wait $pid || true
  echo "$0: training stopped before its step-781 checkpoint; see its log above." >&2
  exit 1
fi
sleep 20  # A margin: orbax renames the step directory into place only once it is complete.
kill -INT $pid
wait $pid || true  # The run exits non-zero when interrupted (a preemption exit), by design.
python -m cjepa_jax.probe --config configs/probe_linear.py --config.pretrained="$dir/checkpoints/781" \
  --config.train_examples=10000 --config.eval_examples=2000 --config.evals=linear,knn,fewshot \
  --workdir "$dir/probe"
