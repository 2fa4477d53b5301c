"""The training-signal table of RESULTS.md's *Tuning runs on one protocol*: each tuning run's
gradient norm, JEPA loss, regulariser term, target feature std and RankMe at its last log step up
to step 781, from the metrics files in results/metrics/.

  python experiments/cifar10/training_signals.py
"""
import json
RUNS = {'I-JEPA': ['ijepa_ep4', 'ijepa_kc11_lr1e-3_stopped_20261203',
                   'ijepa_lr1e-3_stopped_20261203', 'ijepa_kc11_stopped_20261203',
                   'ijepa_ema999_stopped_20261203', 'ijepa_lr2.5e-4_stopped_20261203'],
        'C-JEPA context': ['cjepa_context_ep4_20261201', 'cjepa_kc22_lr5e-4_stopped_20261203',
                           'cjepa_lr5e-4_stopped_20261203', 'cjepa_kc22_stopped_20261203',
                           'cjepa_w0.01_stopped_20261203', 'cjepa_ema999_stopped_20261203'],
        'C-JEPA blocks': ['cjepa_blocks_ep4_20261202', 'cjepa_blocks_kc22_lr5e-4_stopped_20261203',
                          'cjepa_blocks_lr5e-4_stopped_20261203', 'cjepa_blocks_kc22_stopped_20261203',
                          'cjepa_blocks_w0.01_stopped_20261203', 'cjepa_blocks_ema999_stopped_20261203'],
        'SIGReg (EMA)': ['sigreg_w0.01_lr5e-4_ep4_20261203', 'sigreg_w0.01_ep4_20261202',
                         'sigreg_kc22_stopped_20261203', 'sigreg_ema999_stopped_20261203',
                         'sigreg_w0.05_stopped_20261203', 'sigreg_lr2.5e-4_stopped_20261203'],
        'SIGReg, no EMA': ['sigreg_noema_w0.05_lr5e-4_ep4_20261202', 'sigreg_noema_w0.05_stopped_20261202',
                           'sigreg_noema_w0.01_stopped_20261202', 'sigreg_noema_w0.1_stopped_20261203',
                           'sigreg_noema_kc22_stopped_20261203', 'sigreg_noema_lr2.5e-4_stopped_20261203']}
print('| objective | metrics file | gradient norm | JEPA loss | regulariser term | target std | RankMe |')
print('| --- | --- | --- | --- | --- | --- | --- |')
for objective, files in RUNS.items():
  for i, name in enumerate(files):
    with open(f'results/metrics/{name}.jsonl') as f:
      x = [r for r in map(json.loads, f) if 'grad_norm' in r and r['step'] <= 781][-1]
    # I-JEPA applies no regulariser (older runs logged the VICReg term as a diagnostic).
    reg = '-' if objective == 'I-JEPA' else f"{x['vicreg'] if 'vicreg' in x else x['sigreg']:.2f}"
    print(f'| {objective if i == 0 else ""} | `{name}` | {x["grad_norm"]:.3f} | {x["jepa"]:.3f} | '
          f'{reg} | {x["target_feature_std"]:.2f} | {x["target_effective_rank"]:.1f} |')
