#!/bin/bash
# Both budget plots of RESULTS.md's *Objectives against pretraining budget* and the tuning plot of
# its *Tuning runs on one protocol*, from the probe files kept in results/.
# Usage (repository root): bash experiments/cifar10/figures.sh [OUTDIR]   (default results)
set -euo pipefail
O=${1:-results}
Q=results/probes
P=results/probes17
python experiments/cifar10/budget_plot.py --long --out $O/cifar10_budgets_full.png \
  --summary $O/cifar10_budgets_full_summary.json --baseline "random init=$Q/random_init.json" \
  "I-JEPA@4=$Q/ijepa_ep4.json" "I-JEPA@8=$Q/ijepa_ep8.json" \
  "I-JEPA (lr 2.5e-4)@8=$Q/ijepa_lr2.5e-4_ep8.json" \
  "C-JEPA context@4=$Q/cjepa_context_ep4.json" \
  "C-JEPA context, 16-ep run@8=$Q/cjepa_context_ep16run_8.json" \
  "C-JEPA context, 16-ep run@16=$Q/cjepa_context_ep16.json" \
  "C-JEPA blocks@4=$Q/cjepa_blocks_ep4.json" "C-JEPA blocks@8=$Q/cjepa_blocks_ep8.json" \
  "SIGReg (EMA, w 0.01, lr 5e-4)@4=$Q/sigreg_ep4.json" "SIGReg (EMA, w 0.01, lr 5e-4)@8=$Q/sigreg_ep8.json" \
  "SIGReg, no EMA (w 0.05, lr 5e-4)@4=$Q/sigreg_noema_ep4.json" \
  "SIGReg, no EMA (w 0.05, lr 5e-4)@8=$Q/sigreg_noema_ep8.json"

# The subset plot: the points in legend order; every2 adds a long run's checkpoints kept every
# 2 epochs (781 steps an epoch) up to its last.
A=()
every2() {  # LABEL FILE_PREFIX LAST_EPOCH
  for ((E = 2; E <= $3; E += 2)); do A+=("$1@$E=$P/$2_$((E * 781)).json"); done
}
A+=("I-JEPA@1=$P/ijepa_781.json" "I-JEPA@4=$P/ijepa_3124.json")
every2 "I-JEPA, 8-ep run" ijepa8 8
every2 "I-JEPA (lr 2.5e-4), 8-ep run" ijepa8_lr2.5e-4 8
A+=("C-JEPA context@1=$P/cjepa_781.json" "C-JEPA context@4=$P/cjepa_3124.json")
every2 "C-JEPA context, 16-ep run" cjepa16 16
A+=("C-JEPA context (Kc 22, lr 5e-4), stopped@1=$P/cjepa_kc22_lr5e-4_781.json")
A+=("C-JEPA blocks@1=$P/cjepa_blocks_781.json" "C-JEPA blocks@4=$P/cjepa_blocks_3124.json")
every2 "C-JEPA blocks, 8-ep run" cjepa_blocks8 8
A+=("C-JEPA blocks (Kc 22, lr 5e-4), stopped@1=$P/cjepa_blocks_kc22_lr5e-4_781.json")
A+=("SIGReg (EMA, w 0.01, lr 1e-3)@1=$P/sigreg_781.json" "SIGReg (EMA, w 0.01, lr 1e-3)@4=$P/sigreg_3124.json"
    "SIGReg (EMA, w 0.01, lr 1e-3), 8-ep run stopped@3.85=$P/sigreg8_lr1e-3_3010.json"
    "SIGReg (EMA, w 0.01, lr 5e-4)@1=$P/sigreg_lr5e-4_781.json"
    "SIGReg (EMA, w 0.01, lr 5e-4)@4=$P/sigreg_lr5e-4_3124.json")
every2 "SIGReg (EMA, w 0.01, lr 5e-4), 8-ep run" sigreg8lr 8
A+=("SIGReg, no EMA (w 0.05, lr 1e-3)@1=$P/sigreg_noema_781.json"
    "SIGReg, no EMA (w 0.01, lr 1e-3)@1=$P/sigreg_noema_w0.01_781.json"
    "SIGReg, no EMA (w 0.05, lr 5e-4)@1=$P/sigreg_noema_lr5e-4_781.json"
    "SIGReg, no EMA (w 0.05, lr 5e-4)@4=$P/sigreg_noema_lr5e-4_3124.json")
every2 "SIGReg, no EMA (w 0.05, lr 5e-4), 8-ep run" sigreg_noema8 8
python experiments/cifar10/budget_plot.py --long --out $O/cifar10_budgets.png --summary $O/cifar10_budgets_summary.json \
  --baseline "random init=$P/random.json" "${A[@]}"

# The tuning plot: each objective's recipe at step 781 of its 4-epoch run first, then its tuning
# runs (experiments/cifar10/tuning_run.sh), judged on the linear probe's train holdout.
python experiments/cifar10/tuning_plot.py --out $O/cifar10_tuning.png --summary $O/cifar10_tuning_summary.json \
  --title 'Tuning runs at step 781 (1 epoch of a 4-epoch schedule): linear probe, train holdout' \
  "I-JEPA|recipe until 2026-12-03 (Kc 22, lr 5e-4)=$P/ijepa_781.json" \
  "I-JEPA|Kc 11, lr 1e-3=$P/ijepa_kc11_lr1e-3_781.json" \
  "I-JEPA|lr 1e-3=$P/ijepa_lr1e-3_781.json" \
  "I-JEPA|Kc 11=$P/ijepa_kc11_781.json" \
  "I-JEPA|EMA 0.999=$P/ijepa_ema999_781.json" \
  "I-JEPA|lr 2.5e-4 (the recipe since)=$P/ijepa_lr2.5e-4_781.json" \
  "C-JEPA context|recipe (Kc 11, lr 1e-3)=$P/cjepa_781.json" \
  "C-JEPA context|Kc 22, lr 5e-4=$P/cjepa_kc22_lr5e-4_781.json" \
  "C-JEPA context|lr 5e-4=$P/cjepa_lr5e-4_781.json" \
  "C-JEPA context|Kc 22=$P/cjepa_kc22_781.json" \
  "C-JEPA context|VICReg weight 0.01=$P/cjepa_w0.01_781.json" \
  "C-JEPA context|EMA 0.999=$P/cjepa_ema999_781.json" \
  "C-JEPA blocks|recipe (Kc 11, lr 1e-3)=$P/cjepa_blocks_781.json" \
  "C-JEPA blocks|Kc 22, lr 5e-4=$P/cjepa_blocks_kc22_lr5e-4_781.json" \
  "C-JEPA blocks|lr 5e-4=$P/cjepa_blocks_lr5e-4_781.json" \
  "C-JEPA blocks|Kc 22=$P/cjepa_blocks_kc22_781.json" \
  "C-JEPA blocks|VICReg weight 0.01=$P/cjepa_blocks_w0.01_781.json" \
  "C-JEPA blocks|EMA 0.999=$P/cjepa_blocks_ema999_781.json" \
  "SIGReg (EMA)|recipe (w 0.01, lr 5e-4)=$P/sigreg_lr5e-4_781.json" \
  "SIGReg (EMA)|lr 1e-3=$P/sigreg_781.json" \
  "SIGReg (EMA)|Kc 22=$P/sigreg_kc22_781.json" \
  "SIGReg (EMA)|EMA 0.999=$P/sigreg_ema999_781.json" \
  "SIGReg (EMA)|w 0.05=$P/sigreg_w0.05_781.json" \
  "SIGReg (EMA)|lr 2.5e-4=$P/sigreg_lr2.5e-4_781.json" \
  "SIGReg, no EMA|recipe (w 0.05, lr 5e-4)=$P/sigreg_noema_lr5e-4_781.json" \
  "SIGReg, no EMA|lr 1e-3=$P/sigreg_noema_781.json" \
  "SIGReg, no EMA|w 0.01, lr 1e-3=$P/sigreg_noema_w0.01_781.json" \
  "SIGReg, no EMA|w 0.1=$P/sigreg_noema_w0.1_781.json" \
  "SIGReg, no EMA|Kc 22=$P/sigreg_noema_kc22_781.json" \
  "SIGReg, no EMA|lr 2.5e-4=$P/sigreg_noema_lr2.5e-4_781.json"
