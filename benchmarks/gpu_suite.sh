#!/usr/bin/env bash
# The train-step suite of issue 18 in one call: every run of benchmarks/step.py that BENCHMARKS.md's
# H200 table needs, plus the A/B levers for ViT-H/14, one process each, in under 8 minutes.
#
#   bash benchmarks/gpu_suite.sh OUT_DIR            # on one GPU (the lent H200)
#   bash benchmarks/gpu_suite.sh OUT_DIR --dry-run  # tiny shapes on the CPU (in the tests)
#
# Writes into OUT_DIR (at most 8 files, none in sub-folders: what the device tool brings back):
#   results.jsonl     one JSON line per run: step.py's --json object plus name, status
#                     (ok / error / timeout / skipped), rc, wall_s, args, xla_flags, error
#   summary.md        markdown table of results.jsonl (MFU against 989 and 790 TFLOP/s) and the
#                     top ops of the profiled runs
#   profile.tar.gz    jax.profiler traces (XPlane + Perfetto JSON) of a few ViT-H/14 steps
#   nvidia-smi.txt    `nvidia-smi` before and a clock / memory query after ('absent' without one)
#   nvidia-smi-q.txt  `nvidia-smi -q` before the runs
#   env.txt           python, package versions, devices, XLA_FLAGS
#   suite.log         every run's command line and its stdout / stderr
#
# The accelerator machine has no ml_collections (nor TensorFlow, which nothing here imports): when
# it is not importable, the wheels in .whl/ (carried with the call) are installed into a temporary
# folder first. Fill .whl/ on the development machine, once (it is git-ignored):
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#       --implementation cp --platform manylinux2014_x86_64 -d .whl ml-collections==1.1.0
#
# Environment: PYTHON (default python3), SUITE_BUDGET_S (seconds for all the runs; default 420
# on the GPU, 240 dry), STEPS and WARMUP (default 15 and 3 on the GPU). Each run gets its own
# `timeout`, never past the budget; one that would start with under MIN_RUN_S seconds left is
# recorded as skipped. A failing run is recorded with its error and the suite goes on.
set -uo pipefail

usage() { echo "usage: $0 OUT_DIR [--dry-run]" >&2; exit 2; }
[[ $# -ge 1 && $# -le 2 ]] || usage
OUT_DIR=$1
DRY=0
if [[ $# -eq 2 ]]; then
  [[ $2 == --dry-run ]] || usage
  DRY=1
fi

REPO=$(cd "$(dirname "$0")/.." && pwd)
PYTHON=${PYTHON:-python3}
STEP="$REPO/benchmarks/step.py"
REPORT="$REPO/benchmarks/suite_report.py"
mkdir -p "$OUT_DIR" || exit 1
OUT_DIR=$(cd "$OUT_DIR" && pwd)
RESULTS="$OUT_DIR/results.jsonl"
LOG="$OUT_DIR/suite.log"
PROFILE="$OUT_DIR/profile"
: >"$RESULTS"
: >"$LOG"
rm -rf "$PROFILE" "$OUT_DIR/profile.tar.gz"
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
export PYTHONUNBUFFERED=1

say() { echo "[gpu_suite $(date +%H:%M:%S) +${SECONDS}s] $*" | tee -a "$LOG"; }

# ml_collections from the carried wheels when the machine lacks it (pure Python, no deps beyond
# absl-py and PyYAML, which the H200 image has).
if ! "$PYTHON" -c 'import ml_collections' 2>/dev/null; then
  shopt -s nullglob
  wheels=("$REPO"/.whl/*.whl)
  shopt -u nullglob
  if [[ ${#wheels[@]} -eq 0 ]]; then
    say "ml_collections is missing and $REPO/.whl has no wheels: see this script's header."
    exit 1
  fi
  SITE="$WORK/site"
  say "installing ${#wheels[@]} carried wheel(s) into $SITE"
  "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target "$SITE" "${wheels[@]}" >>"$LOG" 2>&1 || { say 'wheel install failed'; exit 1; }
  export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
fi

if [[ $DRY -eq 1 ]]; then
  export JAX_PLATFORMS=cpu
  # Optimisation level 0 makes XLA's CPU compile much cheaper; the dry run checks plumbing only.
  BASE_XLA_FLAGS="${XLA_FLAGS:-} --xla_backend_optimization_level=0"
  BUDGET=${SUITE_BUDGET_S:-240}
  MIN_RUN_S=10
  STEPS=${STEPS:-2}
  WARMUP=${WARMUP:-1}
  # Ti/4, one block, 32 px: each run is a few seconds of compile and milliseconds of steps.
  COMMON=(--variant Ti/4 --depth 1 --image_size 32 --batch_size 8 --dtype bfloat16
          --pred_depth 1 --pred_width 48 --peak_tflops 0.5)
else
  BASE_XLA_FLAGS=${XLA_FLAGS:-}
  BUDGET=${SUITE_BUDGET_S:-420}
  MIN_RUN_S=45
  STEPS=${STEPS:-15}
  WARMUP=${WARMUP:-3}
  # The reference's shape: 224 px, batch 128 per GPU, bf16, predictor 12 x 384.
  COMMON=(--image_size 224 --batch_size 128 --dtype bfloat16 --pred_depth 12 --pred_width 384)
fi
COMMON+=(--steps "$STEPS" --warmup "$WARMUP" --json)

# The matrix, most needed first (a run the budget cannot fit is skipped, the rest go on):
#   NAME|CAP_S|EXTRA_XLA_FLAGS|ARGS   (ARGS split on spaces; 'PROFILE' traces a few steps)
LHS=--xla_gpu_enable_latency_hiding_scheduler=true
NOTRITON=--xla_gpu_enable_triton_gemm=false
if [[ $DRY -eq 1 ]]; then
  MATRIX=(
    # The GPU matrix's kinds of run in two (each run costs a process start and a compile): one
    # with a profile, scan + a remat policy and an XLA flag; and cuDNN attention, which the CPU
    # refuses: the failure path (recorded, the suite goes on).
    "tiny|120|$LHS|--scan --remat dots_with_no_batch_dims_saveable PROFILE"
    "tiny_cudnn|120||--attention cudnn"
  )
else
  MATRIX=(
    "B16|100||--variant B/16"
    "L16|120||--variant L/16"
    "H14_scan|150||--variant H/14 --scan PROFILE"
    "H14_scan_cudnn|150||--variant H/14 --scan --attention cudnn PROFILE"
    "H14|200||--variant H/14"
    "H14_scan_remat_dots|150||--variant H/14 --scan --remat dots_with_no_batch_dims_saveable"
    "H14_scan_remat_full|150||--variant H/14 --scan --remat full"
    "H14_scan_cudnn_b256|150||--variant H/14 --scan --attention cudnn --batch_size 256"
    "H14_scan_cudnn_lhs|150|$LHS|--variant H/14 --scan --attention cudnn"
    "H14_scan_cudnn_notriton|150|$NOTRITON|--variant H/14 --scan --attention cudnn"
    "H14_cudnn|200||--variant H/14 --attention cudnn"
  )
fi

# What ran where.
if command -v nvidia-smi >/dev/null 2>&1; then
  nvidia-smi >"$OUT_DIR/nvidia-smi.txt" 2>&1
  nvidia-smi -q >"$OUT_DIR/nvidia-smi-q.txt" 2>&1
else
  echo absent >"$OUT_DIR/nvidia-smi.txt"
  echo absent >"$OUT_DIR/nvidia-smi-q.txt"
fi
{
  echo "date: $(date -Is)"; echo "host: $(uname -a)"; echo "XLA_FLAGS: $BASE_XLA_FLAGS"
  echo "dry run: $DRY; budget ${BUDGET}s; steps $STEPS, warmup $WARMUP"
  XLA_FLAGS=$BASE_XLA_FLAGS "$PYTHON" -c '
import sys, importlib.metadata as md
print("python", sys.version.split()[0])
for p in ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "ml-collections", "einops",
          "numpy", "jax-cuda13-plugin", "jax-cuda12-plugin"):
  try: print(p, md.version(p))
  except md.PackageNotFoundError: print(p, "absent")
import jax
print("devices", jax.devices())
print("tensorflow imported", "tensorflow" in sys.modules)' 2>&1
} >"$OUT_DIR/env.txt"
say "env: $(tr '\n' ';' <"$OUT_DIR/env.txt" | cut -c1-400)"

for entry in "${MATRIX[@]}"; do
  IFS='|' read -r name cap flags argstr <<<"$entry"
  read -r -a extra <<<"$argstr"
  args=()
  for a in "${extra[@]}"; do
    if [[ $a == PROFILE ]]; then
      args+=(--profile_dir "$PROFILE/$name")
    else
      args+=("$a")
    fi
  done
  # Later flags win in argparse: a variant's --batch_size overrides COMMON's.
  args=("${COMMON[@]}" "${args[@]}")
  run_flags="${BASE_XLA_FLAGS}${flags:+ $flags}"
  left=$((BUDGET - SECONDS))
  if ((left < MIN_RUN_S)); then
    say "$name: skipped (${left}s of the ${BUDGET}s budget left)"
    "$PYTHON" "$REPORT" record --name "$name" --skipped "suite budget: ${left}s left" \
        --xla_flags "$run_flags" --args "${args[*]}" >>"$RESULTS"
    continue
  fi
  limit=$((cap < left ? cap : left))
  say "$name: timeout ${limit}s: XLA_FLAGS='$run_flags' step.py ${args[*]}"
  start=$SECONDS
  XLA_FLAGS=$run_flags timeout --kill-after=10 "$limit" "$PYTHON" "$STEP" "${args[@]}" \
      >"$WORK/out" 2>"$WORK/err"
  rc=$?
  {
    echo "--- $name stdout"; cat "$WORK/out"
    echo "--- $name stderr (rc $rc)"; cat "$WORK/err"
  } >>"$LOG"
  "$PYTHON" "$REPORT" record --name "$name" --rc "$rc" --wall_s "$((SECONDS - start))" \
      --stdout "$WORK/out" --stderr "$WORK/err" --xla_flags "$run_flags" \
      --args "${args[*]}" >>"$RESULTS"
  say "$name: $(tail -n 1 "$RESULTS" | cut -c1-300)"
done

if command -v nvidia-smi >/dev/null 2>&1; then
  {
    echo; echo "after the runs:"
    nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm,temperature.gpu,power.draw,memory.used \
        --format=csv 2>&1
  } >>"$OUT_DIR/nvidia-smi.txt"
fi

"$PYTHON" "$REPORT" summary "$RESULTS" --profile "$PROFILE" >"$OUT_DIR/summary.md" 2>>"$LOG"
# One archive instead of the profiler's deep folder tree: the device tool brings back at most 8
# files, none more than 2 folders down. Without the XPlanes if the whole is too large (16 MiB).
if [[ -d $PROFILE ]]; then
  tar -czf "$OUT_DIR/profile.tar.gz" -C "$OUT_DIR" profile
  if (($(stat -c %s "$OUT_DIR/profile.tar.gz") > 15 * 2**20)); then
    say 'profile.tar.gz over 15 MiB: keeping only the Perfetto traces'
    tar -czf "$OUT_DIR/profile.tar.gz" -C "$OUT_DIR" --exclude='*.xplane.pb' \
        --exclude='*.trace.json.gz' profile
  fi
  rm -rf "$PROFILE"
fi
cat "$OUT_DIR/summary.md"
ok=$(grep -c '"status": "ok"' "$RESULTS")
say "done: $ok of ${#MATRIX[@]} runs ok, ${SECONDS}s; files in $OUT_DIR"
# Non-zero only when nothing ran: failed variants are results, not a failed suite.
((ok > 0))
