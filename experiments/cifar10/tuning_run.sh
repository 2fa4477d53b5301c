#!/bin/bash
# One tuning run of RESULTS.md's tuning protocol: the recipe's OBJECTIVE with the given overrides
# on a 4-epoch schedule, stopped after 1 epoch (its step-781 checkpoint), then the subset probe of
# that checkpoint. The probe's train-holdout linear top-1 is what the run is judged on, against the
# recipe's own 4-epoch run at step 781 (experiments/cifar10/tuning_plot.py).
# Usage (repository root): bash experiments/cifar10/tuning_run.sh RUNDIR OBJECTIVE [--config.X=V ...]
#   e.g. bash experiments/cifar10/tuning_run.sh runs/ctune_lr5 cjepa --config.optim.lr=5e-4 --config.optim.start_lr=1e-4
# Writes RUNDIR (the training workdir, with metrics.jsonl) and RUNDIR/probe (probe_results.json).
#
# How it stops: the trainer has no "stop after step N of a longer schedule" key (total_steps would
# shorten the schedules too), so the script reads the trainer's log as it is written and, at the
# first progress line past step STOP (781), sends it SIGINT: the trainer finishes the step in
# flight, saves it, waits for every pending save (step 781's included) and exits with 75. No
# polling, no sleeping. Until such a key exists this is the one place that knows the protocol.
set -euo pipefail
STOP=${STOP:-781}   # Overridable for a smoke test only.
if [ $# -lt 2 ]; then
  echo "usage: $0 RUNDIR OBJECTIVE [--config.X=V ...] (OBJECTIVE: a configs/cifar10_vit_tiny.py objective)" >&2
  exit 2
fi
dir=$1; objective=$2; shift 2
mkdir -p "$dir"
log=$(mktemp -u "${TMPDIR:-/tmp}/tuning_run.XXXXXX")
mkfifo "$log"
trap 'rm -f "$log"' EXIT
python -m cjepa_jax.train --config "configs/cifar10_vit_tiny.py:$objective" --workdir "$dir" \
  --config.epochs=4 --config.ckpt_every_steps=$STOP --config.keep_every_steps=$STOP \
  --config.evals.knn.every_steps=391 "$@" 2>"$log" &
pid=$!
stopped=0
while IFS= read -r line; do
  printf '%s\n' "$line" >&2
  if [ $stopped = 0 ] && [[ $line =~ step\ ([0-9]+)/[0-9]+\  ]] && ((BASH_REMATCH[1] > STOP)); then
    kill -INT "$pid"; stopped=1
  fi
done <"$log"
rc=0; wait "$pid" || rc=$?
if [ ! -d "$dir/checkpoints/$STOP" ] || { [ $rc != 0 ] && [ $rc != 75 ]; }; then
  echo "$0: training ended (exit $rc) without its step-$STOP checkpoint; see its log above." >&2
  exit 1
fi
python -m cjepa_jax.probe --config configs/probe_linear.py --config.pretrained="$dir/checkpoints/$STOP" \
  --config.train_examples=10000 --config.eval_examples=2000 --config.probes=linear,knn,fewshot \
  --workdir "$dir/probe"
