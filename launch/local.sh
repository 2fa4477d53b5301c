#!/usr/bin/env bash
# Runs cjepa_jax pretraining on this machine.
#
# Usage:
#   launch/local.sh gpu [TRAIN_ARGS...]     one process using every local GPU (or TPU)
#   launch/local.sh cpu N [TRAIN_ARGS...]   N CPU processes on localhost, connected through
#                                           jax.distributed (a multi-host rehearsal on one machine)
#
# TRAIN_ARGS go to `python -m cjepa_jax.train` unchanged, e.g. --config.total_steps=100.
#
# Knobs (environment variables):
#   CONFIG       recipe file                    (default configs/cifar10_vit_tiny.py)
#   WORKDIR      checkpoints, logs, TensorBoard (default /tmp/cjepa/<recipe name>); a rerun with the
#                same WORKDIR resumes from its latest checkpoint
#   PYTHON       interpreter                    (default python3)
#   CPU_DEVICES  cpu mode: fake devices per process via XLA_FLAGS (default 1)
#   PORT         cpu mode: coordinator port on 127.0.0.1 (default: a free port)
#   DRY_RUN=1    print the commands instead of running them
#
# In cpu mode every process gets --coordinator_address=127.0.0.1:PORT --num_processes=N
# --process_id=i. The script waits for all of them and exits non-zero if any failed.
set -euo pipefail

CONFIG="${CONFIG:-configs/cifar10_vit_tiny.py}"
WORKDIR="${WORKDIR:-/tmp/cjepa/$(basename "${CONFIG}" .py)}"
PYTHON="${PYTHON:-python3}"
CPU_DEVICES="${CPU_DEVICES:-1}"
DRY_RUN="${DRY_RUN:-0}"

usage() {
  # The comment block at the top of this file.
  awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0" >&2
  exit 2
}

# shellcheck source-path=SCRIPTDIR source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"   # show()

# The project root, so `python -m cjepa_jax.train` and relative CONFIG paths work from anywhere.
cd "$(dirname "${BASH_SOURCE[0]}")/.."

(( $# >= 1 )) || usage
mode="$1"
shift

case "${mode}" in
  gpu)
    cmd=("${PYTHON}" -m cjepa_jax.train --config "${CONFIG}" --workdir "${WORKDIR}" "$@")
    if [[ "${DRY_RUN}" == 1 ]]; then
      show "${cmd[@]}"
    else
      exec "${cmd[@]}"
    fi
    ;;
  cpu)
    (( $# >= 1 )) || usage
    num="$1"
    shift
    if ! [[ "${num}" =~ ^[1-9][0-9]*$ ]]; then
      echo "local.sh: N must be a positive integer, got '${num}'." >&2
      exit 2
    fi
    if [[ -z "${PORT:-}" ]]; then
      if [[ "${DRY_RUN}" == 1 ]]; then
        PORT=12345
      else
        PORT="$("${PYTHON}" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0))
print(s.getsockname()[1])')"
      fi
    fi
    pids=()
    trap 'kill "${pids[@]}" 2>/dev/null || true' INT TERM
    for ((i = 0; i < num; i++)); do
      cmd=(env JAX_PLATFORMS=cpu "XLA_FLAGS=--xla_force_host_platform_device_count=${CPU_DEVICES}"
           "${PYTHON}" -m cjepa_jax.train --config "${CONFIG}" --workdir "${WORKDIR}"
           "--coordinator_address=127.0.0.1:${PORT}" "--num_processes=${num}" "--process_id=${i}"
           "$@")
      if [[ "${DRY_RUN}" == 1 ]]; then
        show "${cmd[@]}"
      else
        "${cmd[@]}" &
        pids+=("$!")
      fi
    done
    if [[ "${DRY_RUN}" == 1 ]]; then
      exit 0
    fi

    # Wait for every process. When one fails the others stop by themselves: within seconds after a
    # Python exception (cjepa_jax.distributed.fail_fast), after JAX's heartbeat timeout (100 s)
    # after a crash; Ctrl-C stops them all.
    # Ctrl-C / SIGTERM reach every process (the trap above): they checkpoint the same step and
    # exit with code 75, which this script passes on ("saved; run the same command to resume").
    status=0
    for pid in "${pids[@]}"; do
      # A trapped signal makes `wait` return early: wait again until the process has exited.
      while true; do
        rc=0
        wait "${pid}" || rc=$?
        kill -0 "${pid}" 2>/dev/null || break
      done
      if (( rc == 75 && (status == 0 || status == 75) )); then
        status=75
      elif (( rc != 0 )); then
        status=1
      fi
    done
    if (( status == 75 )); then
      echo "local.sh: stopped by a signal after checkpointing; run the same command to resume." >&2
    elif (( status )); then
      echo "local.sh: at least one of the ${num} processes failed." >&2
    fi
    exit "${status}"
    ;;
  *)
    usage
    ;;
esac
