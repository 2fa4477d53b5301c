#!/usr/bin/env bash
# Pretraining on a Cloud TPU VM or pod slice: create it, install the project on every worker, train.
#
# Usage (from any directory; needs an authenticated `gcloud`):
#   PROJECT=my-project ZONE=us-central2-b ACCELERATOR_TYPE=v4-32 \
#   WORKDIR=gs://my-bucket/cjepa/vith14 CONFIG=configs/in1k_vith14_ep300.py \
#     launch/tpu_vm.sh [TRAIN_ARGS...]
# TRAIN_ARGS go to `python3 -m cjepa_jax.train` unchanged (e.g. --config.data.data_dir=gs://...).
#
# Knobs (environment variables):
#   PROJECT           GCP project (default: gcloud's configured one)
#   ZONE              zone with the TPU quota (default us-central2-b)
#   TPU_NAME          VM / pod-slice name (default cjepa-$ACCELERATOR_TYPE)
#   ACCELERATOR_TYPE  e.g. v4-8 (one host), v4-32 (4 hosts), v5p-64 (default v4-32)
#   VERSION           TPU VM runtime image (default tpu-ubuntu2204-base)
#   SPOT=1            create a Spot (preemptible) slice
#   CONFIG            recipe file (default configs/in1k_vith14_ep300.py)
#   WORKDIR           gs://... checkpoints, logs, TensorBoard; required (every worker must see it)
#   REPO_URL          git URL to clone on the workers; default: copy this checkout (without .git)
#   REPO_REF          branch / tag / commit for REPO_URL (default main)
#   JAX_VERSION       jax[tpu] version for the workers, e.g. 0.10.2 (default: the jax version pip
#                     resolved for the project on the worker, so libtpu matches it and jax is
#                     never upgraded past what was installed)
#   STEPS             which of create,setup,train to do (default create,setup,train)
#   LOG_FILE          local copy of the streamed logs (default ./tpu_vm-$TPU_NAME.log)
#   DRY_RUN=1         print the commands instead of running them (no gcloud needed)
#
# `train` runs the trainer on all workers at once (`ssh --worker=all`); jax.distributed.initialize()
# finds the other workers by itself on TPU VMs. The workers' output streams here, each log line
# prefixed [process i/N], and is appended to LOG_FILE. The run ends with the ssh session, so start
# this script under tmux/screen/nohup for long runs. After a lost session run it again with
# STEPS=train, after a Spot preemption with the default STEPS (a PREEMPTED slice is deleted and
# recreated): the trainer resumes from WORKDIR's latest checkpoint.
# Delete the slice when done: gcloud compute tpus tpu-vm delete $TPU_NAME --zone $ZONE.
set -euo pipefail

PROJECT="${PROJECT:-}"
ZONE="${ZONE:-us-central2-b}"
ACCELERATOR_TYPE="${ACCELERATOR_TYPE:-v4-32}"
TPU_NAME="${TPU_NAME:-cjepa-${ACCELERATOR_TYPE}}"
VERSION="${VERSION:-tpu-ubuntu2204-base}"
SPOT="${SPOT:-0}"
CONFIG="${CONFIG:-configs/in1k_vith14_ep300.py}"
WORKDIR="${WORKDIR:-}"
REPO_URL="${REPO_URL:-}"
REPO_REF="${REPO_REF:-main}"
JAX_VERSION="${JAX_VERSION:-}"
STEPS="${STEPS:-create,setup,train}"
LOG_FILE="${LOG_FILE:-tpu_vm-${TPU_NAME}.log}"
DRY_RUN="${DRY_RUN:-0}"

REMOTE_DIR='cjepa_jax'   # Checkout on every worker, relative to the ssh user's home (ssh's cwd).
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

die() {
  echo "tpu_vm.sh: $*" >&2
  exit 2
}

# shellcheck source-path=SCRIPTDIR source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"   # show()

# Runs a command, or prints it with DRY_RUN=1.
run() {
  if [[ "${DRY_RUN}" == 1 ]]; then
    show "$@"
  else
    "$@"
  fi
}

has_step() {
  [[ ",${STEPS}," == *",$1,"* ]]
}

[[ "${WORKDIR}" == gs://* ]] \
  || die "WORKDIR='${WORKDIR}' must be a gs:// path that every TPU worker can read and write" \
         "(set WORKDIR=gs://bucket/dir)."
[[ -z "${JAX_VERSION}" || "${JAX_VERSION}" =~ ^[0-9]+(\.[0-9]+)*[a-z0-9.]*$ ]] \
  || die "JAX_VERSION='${JAX_VERSION}' is not a version number (e.g. JAX_VERSION=0.10.2)."
for step in ${STEPS//,/ }; do
  case "${step}" in
    create|setup|train) ;;
    *) die "unknown step '${step}' in STEPS='${STEPS}';" \
           "use a comma-separated subset of create,setup,train." ;;
  esac
done

gcloud_flags=("--zone=${ZONE}")
if [[ -n "${PROJECT}" ]]; then
  gcloud_flags+=("--project=${PROJECT}")
fi
tpu=(gcloud compute tpus tpu-vm)

if has_step create; then
  # An existing slice is reused, a preempted Spot one recreated. In DRY_RUN mode `describe` is only
  # shown and the slice assumed absent.
  state=''
  if [[ "${DRY_RUN}" == 1 ]]; then
    run "${tpu[@]}" describe "${TPU_NAME}" "${gcloud_flags[@]}" '--format=value(state)'
  else
    state="$("${tpu[@]}" describe "${TPU_NAME}" "${gcloud_flags[@]}" '--format=value(state)' \
             2>/dev/null || true)"
  fi
  if [[ "${state}" == PREEMPTED ]]; then
    echo "tpu_vm.sh: ${TPU_NAME} was preempted; deleting and recreating it."
    run "${tpu[@]}" delete "${TPU_NAME}" "${gcloud_flags[@]}" --quiet
    state=''
  fi
  if [[ -n "${state}" ]]; then
    echo "tpu_vm.sh: ${TPU_NAME} exists (${state}); not creating it."
  else
    create_flags=("--accelerator-type=${ACCELERATOR_TYPE}" "--version=${VERSION}")
    if [[ "${SPOT}" == 1 ]]; then
      create_flags+=(--spot)
    fi
    run "${tpu[@]}" create "${TPU_NAME}" "${gcloud_flags[@]}" "${create_flags[@]}"
  fi
fi

if has_step setup; then
  # jax[tpu] after the project: the project's requirements pull the CPU jaxlib; this adds libtpu
  # for a pinned jax version (an unpinned -U would move jax to whatever is newest that day).
  if [[ -n "${JAX_VERSION}" ]]; then
    jax_pin="$(printf '%q' "jax[tpu]==${JAX_VERSION}")"
  else
    jax_pin="\"jax[tpu]==\$(python3 -c 'import jax; print(jax.__version__)')\""
  fi
  install="cd ${REMOTE_DIR} && python3 -m pip install -q -e ."
  install+=" && python3 -m pip install -q ${jax_pin}"
  if [[ -n "${REPO_URL}" ]]; then
    fetch="rm -rf ${REMOTE_DIR} && git clone -q $(printf '%q' "${REPO_URL}") ${REMOTE_DIR}"
    fetch+=" && git -C ${REMOTE_DIR} checkout -q $(printf '%q' "${REPO_REF}")"
  else
    tarball="${TMPDIR:-/tmp}/cjepa_jax-${TPU_NAME}.tar.gz"
    run tar -czf "${tarball}" --exclude=.git --exclude='*.pyc' --exclude=__pycache__ \
      --exclude=workdirs -C "${ROOT}" .
    run "${tpu[@]}" scp "${tarball}" "${TPU_NAME}:${REMOTE_DIR}.tar.gz" --worker=all \
      "${gcloud_flags[@]}"
    fetch="rm -rf ${REMOTE_DIR} && mkdir -p ${REMOTE_DIR}"
    fetch+=" && tar -xzf ${REMOTE_DIR}.tar.gz -C ${REMOTE_DIR}"
  fi
  run "${tpu[@]}" ssh "${TPU_NAME}" --worker=all "${gcloud_flags[@]}" \
    --command="${fetch} && ${install}"
fi

if has_step train; then
  train="cd ${REMOTE_DIR} && python3 -m cjepa_jax.train"
  train+=" --config $(printf '%q' "${CONFIG}") --workdir $(printf '%q' "${WORKDIR}")"
  for arg in "$@"; do
    train+=" $(printf '%q' "${arg}")"
  done
  if [[ "${DRY_RUN}" == 1 ]]; then
    run "${tpu[@]}" ssh "${TPU_NAME}" --worker=all "${gcloud_flags[@]}" --command="${train}"
  else
    echo "tpu_vm.sh: training on all workers of ${TPU_NAME}; logs also go to ${LOG_FILE}."
    "${tpu[@]}" ssh "${TPU_NAME}" --worker=all "${gcloud_flags[@]}" --command="${train}" 2>&1 \
      | tee -a "${LOG_FILE}"
  fi
fi
