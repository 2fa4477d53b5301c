#!/usr/bin/env bash
# Compiles every shipped recipe for TPU slices on this host (no TPU), one JSON report per row:
# BENCHMARKS.md's "TPU, compiled ahead of time on a CPU host (not run)" table
# (benchmarks/tpu_table.py renders it). Needs `pip install -e '.[tpu]'`.
#
#   bash benchmarks/tpu_compile.sh OUT_DIR [ROW ...]     # all rows, or the named ones
#
# A row already in OUT_DIR is skipped (delete its .json to redo it), so the script can be
# stopped and restarted. Each row is `name|config|topology|extra flags`; the exact command of a
# row is written beside its report (`name.cmd`). Rows run one after another: a ViT-H compile
# takes minutes on 2 cores. `--noestimate` rows report memory and fit only (a scanned model or
# accumulation needs extra compiles for the cost model; see cjepa_jax/compile.py).
set -uo pipefail
out=${1:?usage: tpu_compile.sh OUT_DIR [ROW ...]}
shift
mkdir -p "$out"

ROWS=(
  # I-JEPA ViT-H/14, ImageNet-1K (the IN-22K H/14 recipe compiles to the same step).
  'h14_v5p32|configs/in1k_vith14_ep300.py|v5p-32|'
  'h14_v5p16|configs/in1k_vith14_ep300.py|v5p-16|'
  'h14_v5p8|configs/in1k_vith14_ep300.py|v5p-8|'
  # C-JEPA and fine-tuning.
  'cjepa_b16_v5p8|configs/cjepa_in1k_ep600.py:B/16|v5p-8|'
  'ft_b16_v5p8|configs/finetune_in1k.py:B/16|v5p-8|'
  # ViT-g/16 (scan in its recipe): FSDP over 8 chips against plain data parallel.
  'g16_v5p64|configs/in22k_vitg16_ep44.py|v5p-64|--config.mesh.fsdp=8'
  'g16_v5p64_dp|configs/in22k_vitg16_ep44.py|v5p-64|'
  'cjepa_l16_v5p16|configs/cjepa_in1k_ep600.py:L/16|v5p-16|'
  'ft_l16_v5p16|configs/finetune_in1k.py:L/16|v5p-16|'
  'h14_v5p16_scan|configs/in1k_vith14_ep300.py|v5p-16|--config.model.scan=True --noestimate'
  'h14_v5p8_accum2|configs/in1k_vith14_ep300.py|v5p-8|--config.accum_steps=2 --noestimate'
  'h14_v5p32_scan|configs/in1k_vith14_ep300.py|v5p-32|--config.model.scan=True --noestimate'
  'h14_v5p32_scan_remat|configs/in1k_vith14_ep300.py|v5p-32|--config.model.scan=True --config.model.remat_policy=full --noestimate'
  'ft_h14_v5p16|configs/finetune_in1k.py:H/14|v5p-16|'
  'h16_448_v5p128|configs/in1k_vith16_448_ep300.py|v5p-128|'
  # Scaling: H/14 at global batch 2048 as the slice grows.
  'h14_v5p64|configs/in1k_vith14_ep300.py|v5p-64|'
  'h14_v5p128|configs/in1k_vith14_ep300.py|v5p-128|'
  'h14_v5p256|configs/in1k_vith14_ep300.py|v5p-256|'
  # The smallest v5p slice each of the other recipes fits on (a row that does not fit is the
  # evidence that the next size up is the smallest).
  'cjepa_l16_v5p8|configs/cjepa_in1k_ep600.py:L/16|v5p-8|'
  'ft_l16_v5p8|configs/finetune_in1k.py:L/16|v5p-8|'
  'ft_h14_v5p8|configs/finetune_in1k.py:H/14|v5p-8|'
  'h14_22k_v5p8|configs/in22k_vith14_ep66.py|v5p-8|'
  'h16_448_v5p64|configs/in1k_vith16_448_ep300.py|v5p-64|'
  'h16_448_v5p32_accum2|configs/in1k_vith16_448_ep300.py|v5p-32|--config.accum_steps=2 --noestimate'
  'g16_v5p32_dp|configs/in22k_vitg16_ep44.py|v5p-32|'
  'g16_v5p32|configs/in22k_vitg16_ep44.py|v5p-32|--config.mesh.fsdp=8'
  # With accumulation, one size down.
  'g16_v5p16_accum2|configs/in22k_vitg16_ep44.py|v5p-16|--config.mesh.fsdp=8 --config.accum_steps=2 --noestimate'
)

for row in "${ROWS[@]}"; do
  IFS='|' read -r name config topology extra <<< "$row"
  if [[ $# -gt 0 ]] && [[ " $* " != *" $name "* ]]; then continue; fi
  [[ -s "$out/$name.json" ]] && continue
  # shellcheck disable=SC2206  # The extra flags are meant to split on spaces.
  cmd=(python -m cjepa_jax.compile --config "$config" --topology "$topology" $extra --json)
  echo "${cmd[*]}" > "$out/$name.cmd"
  echo "$(date -u +%H:%M:%S) $name: ${cmd[*]}" >&2
  "${cmd[@]}" > "$out/$name.json.tmp" 2> "$out/$name.err"
  status=$?
  # Exit 1 with a report is "does not fit": a row of the table too.
  if [[ -s "$out/$name.json.tmp" ]]; then mv "$out/$name.json.tmp" "$out/$name.json"; fi
  echo "$(date -u +%H:%M:%S) $name: exit $status" >&2
done
